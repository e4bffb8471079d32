"""The web page ``GET /`` serves: the same public API a client uses (POST a session, stream it over
the WebSocket, acknowledge each chunk, change the prompt, stop), the frames drawn on a canvas at
the model's fps, with the live frame rate and chunk latency."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>graphrt serve</title>
<style>
 body { font: 15px system-ui, sans-serif; margin: 2em; background: #111; color: #eee; }
 input, button { font: inherit; padding: .3em .6em; margin: .2em; }
 #prompt { width: 32em; }
 canvas { display: block; margin: 1em 0; width: 320px; image-rendering: pixelated; background: #000; }
 #stats span { font-variant-numeric: tabular-nums; }
</style></head>
<body>
<h1>graphrt serve</h1>
<div>
 <input id="prompt" value="a red fox runs through the snow" aria-label="prompt">
 <button id="start">Start</button> <button id="change">Change prompt</button> <button id="stop">Stop</button>
</div>
<div><input id="key" placeholder="API key (when the server asks for one)" aria-label="API key"></div>
<canvas id="view" width="64" height="64"></canvas>
<div id="stats">fps <span id="fps">-</span> &middot; chunk latency <span id="latency">-</span> ms &middot;
 frames <span id="frames">0</span> &middot; prompt <span id="used">-</span> &middot; <span id="status">idle</span></div>
<script>
"use strict";
const $ = id => document.getElementById(id);
const page = window.graphrtPage = {drawn: 0, chunks: 0, status: "idle", messages: []};
let ws = null, info = null, header = null, got = 0, timer = null, queue = [], stamps = [];

function setStatus(s) { page.status = s; $("status").textContent = s; }
function auth() { const k = $("key").value; return k ? {"Authorization": "Bearer " + k} : {}; }

async function start() {
  if (ws) ws.close();
  if (timer) clearInterval(timer);
  queue = []; header = null;
  info = await (await fetch("/v1/models", {headers: auth()})).json();
  const c = $("view"); c.width = info.width; c.height = info.height;
  const r = await fetch("/v1/sessions", {method: "POST", headers: {"Content-Type": "application/json", ...auth()},
    body: JSON.stringify({prompt: $("prompt").value, num_chunks: info.max_chunks})});
  const body = await r.json();
  if (r.status !== 201) { setStatus("error: " + (body.error || r.status)); return; }
  const k = $("key").value;
  ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/sessions/" +
                     body.id + "/stream" + (k ? "?access_token=" + encodeURIComponent(k) : ""));
  ws.binaryType = "blob";
  ws.onmessage = onMessage;
  ws.onclose = () => { if (!page.status.startsWith("ended")) setStatus("closed"); };
  timer = setInterval(draw, 1000 / info.fps);
  setStatus("streaming");
}

function onMessage(e) {
  if (typeof e.data !== "string") {                // one JPEG frame of the current chunk, in order
    const slot = {bmp: null};
    queue.push(slot);
    createImageBitmap(e.data).then(b => { slot.bmp = b; });
    if (++got === header.frames) {                  // the whole chunk arrived: acknowledge it
      ws.send(JSON.stringify({type: "ack", index: header.index}));
      page.chunks++;
    }
    return;
  }
  const m = JSON.parse(e.data);
  page.messages.push(m);
  if (m.type === "chunk") {
    header = m; got = 0;
    $("latency").textContent = Math.round(1000 * m.timing.chunk_s);
    $("used").textContent = m.prompt;
  } else if (m.type === "end") {
    setStatus("ended: " + m.reason);
  } else if (m.type === "error") {
    setStatus("error: " + m.message);
  } else if (m.type === "prompt") {
    setStatus("prompt changed");
  }
}

function draw() {
  if (!queue.length || !queue[0].bmp) return;
  $("view").getContext("2d").drawImage(queue.shift().bmp, 0, 0);
  page.drawn++;
  $("frames").textContent = page.drawn;
  const now = performance.now();
  stamps.push(now);
  while (stamps.length && stamps[0] < now - 1000) stamps.shift();
  $("fps").textContent = stamps.length;
}

$("start").onclick = start;
$("change").onclick = () => ws && ws.send(JSON.stringify({type: "prompt", prompt: $("prompt").value}));
$("stop").onclick = () => ws && ws.send(JSON.stringify({type: "stop"}));
</script>
</body></html>
"""
