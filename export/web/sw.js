// Keeps every file of the site (listed in site.json) for offline use: installed after the page's first run,
// then network first (an updated site is picked up when online), the stored copy when offline.
const CACHE = "edge-mla-site";

self.addEventListener("install", (event) => {
  event.waitUntil((async () => {
    const site = await (await fetch("site.json", { cache: "no-cache" })).json();
    const cache = await caches.open(CACHE);
    await cache.addAll(["./", ...site.files]);  // "./": the page's own address
    await self.skipWaiting();
  })());
});

self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

self.addEventListener("fetch", (event) => {
  if (event.request.method !== "GET") return;
  event.respondWith((async () => {
    try {
      const response = await fetch(event.request);
      if (response.ok && new URL(event.request.url).origin === location.origin) {
        const copy = response.clone();
        caches.open(CACHE).then((cache) => cache.put(event.request, copy));
      }
      return response;
    } catch (err) {
      const stored = await caches.match(event.request, { ignoreSearch: true });
      if (stored) return stored;
      throw err;
    }
  })());
});
