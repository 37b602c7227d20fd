// qwen3next web chat: talks to this server's OpenAI API (GET v1/models, POST v1/chat/completions streamed as SSE).
// Every URL is relative to the page's address, so the page also works under a reverse proxy's sub-path.
// Replies are rendered as Markdown by marked and sanitised by DOMPurify before they reach the DOM; user text, tool
// calls and errors are only ever set as textContent.
(() => {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const el = {
    model: $('model'), settingsToggle: $('settings-toggle'), reset: $('reset'), settings: $('settings'),
    apiKey: $('api-key'), system: $('system'), temperature: $('temperature'), topP: $('top-p'),
    maxTokens: $('max-tokens'), seed: $('seed'), tools: $('tools'), extra: $('extra'),
    messages: $('messages'), empty: $('empty'), error: $('error'), composer: $('composer'), input: $('input'),
    send: $('send'), stop: $('stop'),
  };
  const STORE = 'qwen3next.chat.';
  const SETTINGS = ['system', 'temperature', 'topP', 'maxTokens', 'seed', 'tools', 'extra'];
  const RENDER_MS = 100;  // while a reply streams, its Markdown is rendered again at most this often (and at the end)

  let history = [];        // the conversation in OpenAI's message format (the system prompt is added per request)
  let controller = null;   // AbortController of the request in flight
  let modelName = null;    // from GET /v1/models; requests go without `model` until it is known
  let modelError = false;  // whether the error shown came from loading the model list

  // ---- storage --------------------------------------------------------------------------------------------------

  function storageGet(key) {
    try { return window.localStorage.getItem(STORE + key); } catch (e) { return null; }
  }

  function storageSet(key, value) {
    try { window.localStorage.setItem(STORE + key, value); } catch (e) { /* private mode: not kept */ }
  }

  function loadSettings() {
    el.apiKey.value = storageGet('apiKey') || '';
    let saved = {};
    try { saved = JSON.parse(storageGet('settings') || '{}') || {}; } catch (e) { saved = {}; }
    for (const name of SETTINGS) {
      if (typeof saved[name] === 'string') el[name].value = saved[name];
    }
  }

  function saveSettings() {
    const out = {};
    for (const name of SETTINGS) out[name] = el[name].value;
    storageSet('settings', JSON.stringify(out));
  }

  // ---- errors ---------------------------------------------------------------------------------------------------

  function showError(text, fromModels = false) {
    el.error.textContent = text;
    el.error.hidden = false;
    modelError = fromModels;
  }

  function clearError() {
    el.error.textContent = '';
    el.error.hidden = true;
    modelError = false;
  }

  // "401 invalid or missing API key (...)" from an OpenAI-shaped error body, or the status line
  async function httpErrorText(resp) {
    let message = resp.statusText || 'request failed';
    try {
      const text = await resp.text();
      try {
        const body = JSON.parse(text);
        if (body && body.error) {
          message = typeof body.error === 'string' ? body.error : (body.error.message || JSON.stringify(body.error));
        } else if (body && body.detail) {
          message = typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail);
        }
      } catch (e) {
        if (text.trim()) message = text.trim().slice(0, 500);
      }
    } catch (e) { /* keep the status text */ }
    return `Error ${resp.status}: ${message}`;
  }

  class ReplyError extends Error {}

  // ---- Markdown -------------------------------------------------------------------------------------------------

  const markdownOK = !!(window.marked && typeof window.marked.parse === 'function' && window.DOMPurify &&
                        typeof window.DOMPurify.sanitize === 'function' && window.DOMPurify.isSupported);
  if (markdownOK) {
    window.DOMPurify.addHook('afterSanitizeAttributes', (node) => {
      if (node.tagName === 'A' && node.hasAttribute('href')) {
        node.setAttribute('target', '_blank');
        node.setAttribute('rel', 'noopener noreferrer');
      }
    });
  }

  function renderMarkdown(target, text) {
    if (markdownOK) {
      const html = window.marked.parse(text, { gfm: true, breaks: true, async: false });
      target.innerHTML = window.DOMPurify.sanitize(html);
    } else {  // the vendored libraries did not load: plain text, never raw HTML
      target.textContent = text;
      target.classList.add('plain');
    }
  }

  // ---- transcript -----------------------------------------------------------------------------------------------

  function nearBottom() {
    const m = el.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 60;
  }

  function scrollDown() {
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  function addMessage(role) {
    el.empty.hidden = true;
    const root = document.createElement('div');
    root.className = `msg ${role}`;
    const label = document.createElement('div');
    label.className = 'role';
    label.textContent = role;
    const body = document.createElement('div');
    body.className = role === 'assistant' ? 'body markdown' : 'body plain';
    const calls = document.createElement('div');
    calls.className = 'calls';
    const meta = document.createElement('div');
    meta.className = 'meta';
    root.append(label, body, calls, meta);
    el.messages.append(root);
    scrollDown();
    return { root, body, calls, meta };
  }

  function prettyArguments(args) {
    try { return JSON.stringify(JSON.parse(args), null, 2); } catch (e) { return args; }
  }

  function renderCalls(container, calls) {
    container.replaceChildren(...calls.map((call) => {
      const box = document.createElement('div');
      box.className = 'tool-call';
      const head = document.createElement('div');
      head.className = 'tool-call-head';
      const tag = document.createElement('span');
      tag.className = 'tag';
      tag.textContent = 'tool call';
      const name = document.createElement('code');
      name.className = 'tool-name';
      name.textContent = call.function.name || '?';
      head.append(tag, ' ', name);
      if (call.id) {
        const id = document.createElement('span');
        id.className = 'muted';
        id.textContent = ` ${call.id}`;
        head.append(id);
      }
      const args = document.createElement('pre');
      args.className = 'tool-args';
      args.textContent = prettyArguments(call.function.arguments);
      box.append(head, args);
      return box;
    }));
  }

  // ---- request --------------------------------------------------------------------------------------------------

  function authHeaders(json) {
    const headers = {};
    if (json) headers['Content-Type'] = 'application/json';
    const key = el.apiKey.value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    return headers;
  }

  function numberField(input, label, integer) {
    const raw = input.value.trim();
    if (!raw) return undefined;
    const value = Number(raw);
    if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
      throw new ReplyError(`${label}: expected ${integer ? 'an integer' : 'a number'}, got ${JSON.stringify(raw)}`);
    }
    return value;
  }

  function jsonField(input, label, check, what) {
    const raw = input.value.trim();
    if (!raw) return undefined;
    let value;
    try { value = JSON.parse(raw); } catch (e) { throw new ReplyError(`${label}: invalid JSON (${e.message})`); }
    if (!check(value)) throw new ReplyError(`${label}: expected ${what}`);
    return value;
  }

  function requestBody(messages) {
    const body = { messages, stream: true, stream_options: { include_usage: true } };
    if (modelName) body.model = modelName;
    const fields = [['temperature', el.temperature, 'Temperature', false], ['top_p', el.topP, 'Top-p', false],
                    ['max_tokens', el.maxTokens, 'Max tokens', true], ['seed', el.seed, 'Seed', true]];
    for (const [name, input, label, integer] of fields) {
      const value = numberField(input, label, integer);
      if (value !== undefined) body[name] = value;
    }
    const tools = jsonField(el.tools, 'Tools', Array.isArray, 'a JSON array of tools');
    if (tools && tools.length) body.tools = tools;
    const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
    Object.assign(body, jsonField(el.extra, 'Extra request fields', isObject, 'a JSON object') || {});
    body.stream = true;  // this page reads server-sent events
    return body;
  }

  // Reads `data: ...` events until `data: [DONE]`; true if it came, false if the stream just ended.
  async function readEvents(resp, onData) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    const handle = (block) => {
      const data = block.split(/\r?\n/).filter((line) => line.startsWith('data:'))
        .map((line) => line.slice(5).replace(/^ /, '')).join('\n');
      if (!data) return false;
      if (data === '[DONE]') return true;
      onData(JSON.parse(data));
      return false;
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let m;
      while ((m = /\r?\n\r?\n/.exec(buffer))) {
        const block = buffer.slice(0, m.index);
        buffer = buffer.slice(m.index + m[0].length);
        if (handle(block)) {
          reader.cancel().catch(() => {});
          return true;
        }
      }
    }
    buffer += decoder.decode();
    return buffer.trim() ? handle(buffer) : false;
  }

  function setBusy(busy) {
    document.body.classList.toggle('busy', busy);
    el.send.disabled = busy;
    el.stop.disabled = !busy;
  }

  async function send(text) {
    clearError();
    const userMessage = { role: 'user', content: text };
    const messages = [];
    const system = el.system.value.trim();
    if (system) messages.push({ role: 'system', content: system });
    messages.push(...history, userMessage);
    let body;
    try {
      body = requestBody(messages);
    } catch (e) {
      showError(e.message);
      return;
    }

    const userView = addMessage('user');
    userView.body.textContent = text;
    const view = addMessage('assistant');
    view.root.dataset.state = 'streaming';
    el.input.value = '';
    setBusy(true);
    const ctrl = new AbortController();
    controller = ctrl;

    const reply = { content: '', calls: [], finish: null, usage: null, chunks: 0 };
    let started = false;
    let firstAt = null;
    // Each render parses the whole reply so far, so renders are spaced: RENDER_MS apart, or four times as long as the
    // last one took, whichever is more (a long reply then costs O(n) per interval, not O(n) per chunk or frame).
    let timer = 0;
    let renderedAt = -Infinity;
    let renderCost = 0;
    const render = () => {
      timer = 0;
      const start = performance.now();
      const follow = nearBottom();
      renderMarkdown(view.body, reply.content);
      renderCalls(view.calls, reply.calls.filter(Boolean));
      if (follow) scrollDown();
      renderedAt = performance.now();
      renderCost = renderedAt - start;
    };
    const scheduleRender = () => {
      if (timer) return;
      const due = renderedAt + Math.max(RENDER_MS, 4 * renderCost);
      timer = window.setTimeout(render, Math.max(0, due - performance.now()));
    };
    const onData = (chunk) => {
      if (firstAt === null) firstAt = performance.now();  // the rate below counts from the first event
      if (chunk.error) {
        throw new ReplyError(`Error: ${chunk.error.message || JSON.stringify(chunk.error)}`);
      }
      if (chunk.usage) reply.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.index) continue;  // the page asks for one choice
        const delta = choice.delta || {};
        if (typeof delta.content === 'string' && delta.content) {
          reply.content += delta.content;
          reply.chunks += 1;
        }
        for (const tc of delta.tool_calls || []) {
          const i = tc.index || 0;
          if (!reply.calls[i]) reply.calls[i] = { id: '', type: 'function', function: { name: '', arguments: '' } };
          const call = reply.calls[i];
          if (tc.id) call.id = tc.id;
          if (tc.function && tc.function.name) call.function.name += tc.function.name;
          if (tc.function && tc.function.arguments) call.function.arguments += tc.function.arguments;
        }
        if (choice.finish_reason) reply.finish = choice.finish_reason;
      }
      scheduleRender();
    };

    let outcome = 'done';
    let failure = null;
    try {
      const resp = await fetch('v1/chat/completions', {
        method: 'POST', headers: authHeaders(true), body: JSON.stringify(body), signal: ctrl.signal,
      });
      if (!resp.ok) throw new ReplyError(await httpErrorText(resp));
      started = true;
      if (!(await readEvents(resp, onData))) throw new ReplyError('Error: the reply stream ended early');
    } catch (e) {
      if (e && e.name === 'AbortError') {
        outcome = 'stopped';
      } else {
        outcome = 'error';
        failure = e instanceof ReplyError ? e.message : `Error: ${e && e.message ? e.message : e}`;
        ctrl.abort();  // drop the connection if it is still open: the server then aborts the generation
      }
    } finally {
      if (controller === ctrl) controller = null;
      setBusy(false);
    }
    if (timer) window.clearTimeout(timer);
    timer = 0;

    if (!view.root.isConnected) return;  // the conversation was reset meanwhile
    if (outcome === 'error' && !started) {  // nothing came back: undo the turn, give the text back
      userView.root.remove();
      view.root.remove();
      el.empty.hidden = el.messages.querySelector('.msg') !== null;
      if (!el.input.value) el.input.value = text;
      showError(failure);
      return;
    }
    render();  // the final text, whatever the throttle held back
    // History for the next request: the user's message always (it stays in the transcript); a finished reply as is;
    // of a stopped one its partial text (its tool calls, cut off and never answered, are dropped); nothing of a failed
    // or an empty reply, so the model never sees an error's leftovers or an empty turn.
    const calls = reply.calls.filter(Boolean);
    let assistant = null;
    if (outcome === 'done' && (reply.content.trim() || calls.length)) {
      assistant = { role: 'assistant', content: reply.content };
      if (calls.length) assistant.tool_calls = calls;
    } else if (outcome === 'stopped' && reply.content.trim()) {
      assistant = { role: 'assistant', content: reply.content };
    }
    history.push(userMessage);
    if (assistant) history.push(assistant);

    view.root.dataset.state = outcome;
    view.root.dataset.history = assistant ? 'kept' : 'left-out';
    const parts = [];
    const tokens = reply.usage ? reply.usage.completion_tokens : reply.chunks;
    if (tokens) parts.push(`${tokens} tokens`);
    const seconds = firstAt === null ? 0 : (performance.now() - firstAt) / 1000;
    if (tokens > 1 && seconds > 0) parts.push(`${(tokens / seconds).toFixed(1)} tok/s`);
    if (outcome === 'stopped') parts.push('stopped');
    else if (outcome === 'error') parts.push('failed');
    else if (reply.finish) parts.push(reply.finish === 'length' ? 'length (max tokens reached)' : reply.finish);
    if (!assistant) parts.push('not in history');
    view.meta.textContent = parts.join(' · ');
    if (outcome === 'error') showError(failure);
  }

  function stop() {
    if (controller) controller.abort();
  }

  function reset() {
    stop();
    history = [];
    for (const node of el.messages.querySelectorAll('.msg')) node.remove();
    el.empty.hidden = false;
    if (!modelError) clearError();
    el.input.focus();
  }

  // ---- model ----------------------------------------------------------------------------------------------------

  async function loadModel() {
    el.model.textContent = '…';
    el.model.classList.remove('bad');
    try {
      const resp = await fetch('v1/models', { headers: authHeaders(false) });
      if (!resp.ok) {
        modelName = null;
        el.model.textContent = 'model unknown';
        el.model.classList.add('bad');
        showError(`${await httpErrorText(resp)} (GET /v1/models)`, true);
        return;
      }
      const card = ((await resp.json()).data || [])[0];
      modelName = card ? card.id : null;
      el.model.textContent = modelName || 'no model';
      el.model.title = card && card.max_model_len ? `${card.id}: context of ${card.max_model_len} tokens` : '';
      clearError();  // a working key also settles an earlier 401 of a chat request
    } catch (e) {
      modelName = null;
      el.model.textContent = 'offline';
      el.model.classList.add('bad');
      showError(`Cannot reach the server: ${e.message}`, true);
    }
  }

  // ---- wiring ---------------------------------------------------------------------------------------------------

  function setSettingsOpen(open) {
    document.body.dataset.settings = open ? 'open' : 'closed';
    el.settingsToggle.setAttribute('aria-expanded', String(open));
  }

  loadSettings();
  setSettingsOpen(window.matchMedia('(min-width: 800px)').matches);
  el.settingsToggle.addEventListener('click', () => setSettingsOpen(document.body.dataset.settings !== 'open'));
  for (const name of SETTINGS) el[name].addEventListener('input', saveSettings);
  el.apiKey.addEventListener('change', () => {
    storageSet('apiKey', el.apiKey.value.trim());
    loadModel();
  });
  el.composer.addEventListener('submit', (e) => {
    e.preventDefault();
    const text = el.input.value;
    if (controller || !text.trim()) return;
    send(text);
  });
  el.input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      el.composer.requestSubmit();
    }
  });
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && controller) stop();
  });
  el.stop.addEventListener('click', stop);
  el.reset.addEventListener('click', reset);
  loadModel();
  el.input.focus();
})();
