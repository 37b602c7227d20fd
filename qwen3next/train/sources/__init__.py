"""Readers of the Debian packages the demo corpus is built from (see ``qwen3next.train.corpus``).

``rdata``: R's serialization format and lazy-load databases; ``austen``: Jane Austen's novels from
``r-cran-janeaustenr``; ``sword``: the Bible module of ``sword-text-web``, whose OSIS markup ``osis`` turns into text.
"""
