// The dashboard's only script: confirmation for actions, and live regions refreshed when the server says
// something changed (server-sent events, at most one look a second on the server's side).
document.addEventListener("submit", (e) => {
  const msg = e.target.dataset.confirm;
  if (msg && !window.confirm(msg)) e.preventDefault();
});

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try {
    const r = await fetch(location.href, { headers: { "Accept": "text/html" } });
    if (!r.ok) return;
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    for (const el of document.querySelectorAll("[data-live]")) {
      const fresh = doc.getElementById(el.id);
      if (!fresh || el.contains(document.activeElement) && document.activeElement.tagName === "INPUT") continue;
      if (fresh.outerHTML === el.outerHTML) continue;  // unchanged: its pictures are not fetched again
      el.replaceWith(fresh);
    }
  } finally {
    busy = false;
  }
}

if (window.EventSource) {
  const events = new EventSource("/events");
  events.addEventListener("change", refresh);
}
