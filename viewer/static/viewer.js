// creps-gigapixel viewer page: OpenSeadragon over /image.dzi (tiles from the
// zarr store made on the fly, or rendered on demand in endless mode) or an
// exported DZI, plus the job's metadata from /api/info.
//
// Store mode: while a render runs, the page polls /api/info and, when
// progress changes, opens the same tile source with a new ?v= on top of the
// old one and drops the old one once the new one has loaded: tiles fill in
// without flashing black.
//
// Endless mode (render.py view --checkpoint): every tile costs a render, so
// the page schedules its own tile fetches (TileLoader): at most LIMIT at a
// time (the browser's other connections stay free for the page and
// /api/info), coarse levels first, newest first within a level, and a fetch
// whose tile left the screen is aborted and parked -- the server sees the
// connection close and drops the render if it has not started. Areas with no
// tile yet show a hatched "pending" background, never black. The panel shows
// the current level and zoom, tiles rendered / from cache, pending tiles and
// the last tile's latency.
//
// In every mode the URL's fragment carries the view (#x=..&y=..&z=..: centre
// in full-resolution pixels, zoom in screen px per image px), so a link
// reopens the same spot. Test hooks live on window.creps.
"use strict";
(function () {
  const POLL_RUNNING_MS = 2000;
  const POLL_IDLE_MS = 15000;
  const POLL_ENDLESS_MS = 1000;
  const hooks = {
    opened: false, tilesLoaded: 0, tileUrls: [], info: null, swaps: 0,
    tileStats: [], abandoned: 0, fetched: 0, level: null, zoom: null,
  };
  window.creps = hooks;

  const viewer = OpenSeadragon({
    id: "osd",
    prefixUrl: "/osd/images/",
    drawer: "canvas",          // 2D canvas: works without a GPU, pixels readable by tests
    showNavigator: true,
    autoHideControls: false,  // keep the navigator and buttons on screen
    navigatorPosition: "BOTTOM_RIGHT",
    visibilityRatio: 0.5,
    maxZoomPixelRatio: 4,
    timeout: 60000,
    tileRetryMax: 5,          // the server answers 503 + Retry-After when its tile work is full
    tileRetryDelay: 1000,
  });
  window.viewer = viewer;
  viewer.addHandler("open", () => { hooks.opened = true; applyHashView(); showView(); });
  viewer.addHandler("tile-loaded", (e) => {
    hooks.tilesLoaded += 1;
    if (e.tile && e.tile.getUrl) hooks.tileUrls.push(e.tile.getUrl());
  });
  viewer.addHandler("open-failed", (e) => status("could not open the image: " + (e.message || "error")));
  // OSD marks a tile that failed as missing for good; a tile the endless page gave up while parked (or
  // that waited past OSD's timeout) is not missing: let OSD request it again when it is needed.
  viewer.addHandler("tile-load-failed", (e) => {
    const msg = String(e.message || "");
    if (loader.enabled && (msg === PARKED || msg.includes("exceeded timeout"))) {
      setTimeout(() => { e.tile.exists = true; e.tile.loading = false; }, 0);
    }
  });
  viewer.addHandler("viewport-change", () => { showView(); loader.pump(); });  // also immediate moves
  viewer.addHandler("animation", () => { showView(); loader.pump(); });
  viewer.addHandler("animation-finish", () => { showView(); saveHashView(); loader.pump(); });

  let version = null;
  let swapping = false;

  function $(id) { return document.getElementById(id); }
  function status(text) { $("status").textContent = text || ""; }
  function set(id, value) { $(id).textContent = value === null || value === undefined ? "–" : String(value); }

  function sourceUrl(info) {
    return info.mode === "dzi" ? info.tile_source : info.tile_source + "?v=" + encodeURIComponent(info.version);
  }

  function running(info) {
    return info.tiles_total !== null && info.tiles_done !== null && info.tiles_done < info.tiles_total;
  }

  // ------------------------------------------------------------ view: level, zoom, URL
  function topLevel() {
    const info = hooks.info;
    return info ? Math.ceil(Math.log2(Math.max(info.width, info.height))) : 0;
  }

  // Screen pixels per full-resolution image pixel (null before the image opens).
  function imageZoom() {
    const item = viewer.world.getItemAt(0);
    return item ? item.viewportToImageZoom(viewer.viewport.getZoom(true)) : null;
  }

  // The DZI level whose pixels are about one device pixel at the current zoom: the one being drawn.
  function currentLevel() {
    const z = imageZoom();
    if (z === null) return null;
    const level = topLevel() + Math.ceil(Math.log2(z * (window.devicePixelRatio || 1)) - 0.01);  // 0.01: float drift
    return Math.max(0, Math.min(topLevel(), level));
  }

  function zoomText(z) {
    if (z >= 1) return (z >= 10 ? z.toFixed(0) : z.toFixed(2)) + "× (1 px = " + z.toFixed(1) + " screen px)";
    return "1 : " + (1 / z >= 100 ? Math.round(1 / z).toLocaleString("en") : (1 / z).toFixed(2));
  }

  hooks.currentLevel = currentLevel;

  function showView() {
    const z = imageZoom();
    if (z === null) return;
    hooks.level = currentLevel();
    hooks.zoom = z;
    set("f-view", "level " + hooks.level + " of " + topLevel() + " · zoom " + zoomText(z));
  }

  function parseHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    const x = parseFloat(p.get("x")), y = parseFloat(p.get("y")), z = parseFloat(p.get("z"));
    return [x, y, z].every(Number.isFinite) && z > 0 ? { x, y, z } : null;
  }

  function applyHashView() {
    const v = parseHash();
    const item = viewer.world.getItemAt(0);
    if (!v || !item) return;
    viewer.viewport.zoomTo(item.imageToViewportZoom(v.z), null, true);
    viewer.viewport.panTo(item.imageToViewportCoordinates(v.x, v.y), true);
    viewer.viewport.applyConstraints(true);
  }

  function saveHashView() {
    const item = viewer.world.getItemAt(0);
    if (!item) return;
    const c = item.viewportToImageCoordinates(viewer.viewport.getCenter(true));
    const z = imageZoom();
    const hash = "#x=" + c.x.toFixed(1) + "&y=" + c.y.toFixed(1) + "&z=" + z.toPrecision(6);
    if (hash !== location.hash) history.replaceState(null, "", location.pathname + location.search + hash);
  }

  // ------------------------------------------------------------ endless mode: the page's tile loader
  const PARKED = "[endless] parked too long";
  const loader = {
    LIMIT: 4,
    PARK_MAX: 1000,
    enabled: false,
    queue: [],            // OSD image jobs not fetched yet (wanted or parked)
    inflight: new Map(),  // job -> AbortController
    seq: 0,

    // Is this job's tile still on screen, at a level the current zoom uses?
    wanted(job) {
      const tile = job.tile;
      if (!tile || !tile.bounds || tile.level === undefined) return true;
      const level = currentLevel();
      if (level !== null && tile.level > level + 1) return false;
      const b = viewer.viewport.getBounds(true);
      const mx = b.width * 0.1, my = b.height * 0.1;
      const t = tile.bounds;
      return t.x < b.x + b.width + mx && t.x + t.width > b.x - mx && t.y < b.y + b.height + my && t.y + t.height > b.y - my;
    },

    start(job) {
      const ctl = new AbortController();
      this.inflight.set(job, ctl);
      hooks.fetched += 1;
      fetch(job.src, { signal: ctl.signal, credentials: "same-origin" })
        .then((r) => {
          if (!r.ok) throw new Error("HTTP " + r.status);
          return r.blob();
        })
        .then(async (blob) => {
          if (this.inflight.get(job) !== ctl) return;  // aborted meanwhile
          this.inflight.delete(job);
          if (window.crepsMeasure) await measure(job, blob);
          job.finish(blob, null, "rasterBlob");
        })
        .catch((err) => {
          if (err.name === "AbortError" || this.inflight.get(job) !== ctl) return;  // parked or given up
          this.inflight.delete(job);
          job.fail("[endless] " + err.message, null);  // OSD retries (503: the server is busy)
        })
        .finally(() => this.pump());
    },

    // Abort fetches whose tile left the screen (park them), then start the best wanted jobs.
    pump() {
      if (!this.enabled) return;
      for (const [job, ctl] of this.inflight) {
        if (!this.wanted(job)) {
          this.inflight.delete(job);
          ctl.abort();
          this.queue.push(job);
          hooks.abandoned += 1;
        }
      }
      // Bound the parked jobs (a long tour leaves many behind): give up the oldest; their tiles are
      // revived below, so OSD asks for them again if they come back on screen.
      while (this.queue.length > this.PARK_MAX) {
        const job = this.queue.shift();
        job.tries = 1 + viewer.tileRetryMax;  // no automatic retry: revived on demand instead
        job.fail(PARKED, null);
      }
      while (this.inflight.size < this.LIMIT) {
        let best = -1;
        for (let i = 0; i < this.queue.length; i++) {
          const j = this.queue[i];
          if (!this.wanted(j)) continue;
          if (best < 0) { best = i; continue; }
          const b = this.queue[best];
          const lj = j.tile ? j.tile.level : 0, lb = b.tile ? b.tile.level : 0;
          if (lj < lb || (lj === lb && j.creps_seq > b.creps_seq)) best = i;
        }
        if (best < 0) break;
        this.start(this.queue.splice(best, 1)[0]);
      }
      showPending();
    },

    install() {
      const self = this;
      this.enabled = true;
      viewer.imageLoader.timeout = 3600000;  // parked jobs wait for their tile to come back on screen
      const proto = OpenSeadragon.DziTileSource.prototype;
      proto.downloadTileStart = function (job) {
        job.creps_seq = ++self.seq;
        self.queue.push(job);
        self.pump();
      };
      proto.downloadTileAbort = function (job) {  // OSD gave up on it (its timeout)
        const ctl = self.inflight.get(job);
        if (ctl) { self.inflight.delete(job); ctl.abort(); }
        const i = self.queue.indexOf(job);
        if (i >= 0) self.queue.splice(i, 1);
      };
    },
  };

  // Tests: the decoded tile's brightness and spread, per level (window.crepsMeasure = true).
  async function measure(job, blob) {
    const bmp = await createImageBitmap(blob);
    const c = new OffscreenCanvas(bmp.width, bmp.height);
    const ctx = c.getContext("2d");
    ctx.drawImage(bmp, 0, 0);
    const d = ctx.getImageData(0, 0, bmp.width, bmp.height).data;
    let sum = 0, sum2 = 0, black = 0;
    const n = d.length / 4;
    for (let i = 0; i < d.length; i += 4) {
      const v = (d[i] + d[i + 1] + d[i + 2]) / 3;
      if (d[i] + d[i + 1] + d[i + 2] === 0) black++;
      sum += v; sum2 += v * v;
    }
    const mean = sum / n;
    hooks.tileStats.push({
      url: job.src, level: job.tile ? job.tile.level : null, w: bmp.width, h: bmp.height,
      mean: mean, std: Math.sqrt(Math.max(0, sum2 / n - mean * mean)), black: black / n,
    });
  }

  // A hatched pattern: "not rendered yet", clearly not part of the image (and not black).
  let pattern = null;
  function hatch(tiledImage, ctx) {
    if (pattern === null) {
      const c = document.createElement("canvas");
      c.width = c.height = 16;
      const g = c.getContext("2d");
      g.fillStyle = "#34343c";
      g.fillRect(0, 0, 16, 16);
      g.strokeStyle = "#5a5a66";
      g.lineWidth = 3;
      g.beginPath();
      for (const o of [-16, 0, 16]) { g.moveTo(o, 16); g.lineTo(o + 16, 0); }
      g.stroke();
      pattern = ctx.createPattern(c, "repeat");
    }
    return pattern;
  }

  function showPending() {
    if (!loader.enabled) return;
    const waiting = loader.queue.filter((j) => loader.wanted(j)).length;
    const n = waiting + loader.inflight.size;
    hooks.pending = n;
    set("f-pending", n ? n + " tile" + (n > 1 ? "s" : "") + " (" + loader.inflight.size + " requested)" : "none");
    document.body.classList.toggle("pending", n > 0);
  }

  // ------------------------------------------------------------ panel
  function showInfo(info) {
    const mp = (info.width * info.height) / 1e6;
    const amount = mp >= 1e6 ? (mp / 1e6).toFixed(2) + " terapixels"
      : mp >= 1000 ? (mp / 1000).toFixed(2) + " gigapixels" : mp.toFixed(1) + " megapixels";
    set("f-size", info.width + " × " + info.height + " px (" + amount + ")");
    let ckpt = info.checkpoint;
    const sha = info.checkpoint_sha256;
    if (sha && /^[0-9a-f]{64}$/.test(sha)) ckpt = (ckpt ? ckpt + " " : "") + "sha256 " + sha.slice(0, 12) + "…";
    else if (sha && sha !== ckpt) ckpt = (ckpt ? ckpt + " " : "") + "(" + sha + ")";
    set("f-checkpoint", ckpt);
    $("f-checkpoint").title = info.checkpoint_sha256 || "";
    set("f-seed", info.seed);
    set("f-psi", info.psi);
    if (info.mode === "endless") {
      set("f-levels", info.dzi_levels + " DeepZoom levels, each tile rendered when first looked at");
    } else if (info.mode === "zarr") {
      set("f-levels", info.zarr_levels > 1 ? info.zarr_levels + " zarr levels"
        : "level 0 only (coarse tiles averaged on the fly)");
    } else {
      set("f-levels", "exported DeepZoom (" + info.tile_format + ")");
    }
    const bar = $("bar");
    if (info.mode === "endless") {
      showEndless(info.endless);
      bar.hidden = true;
    } else if (info.tiles_total) {
      const pct = (100 * info.tiles_done) / info.tiles_total;
      set("f-progress", info.tiles_done + " / " + info.tiles_total + " tiles (" + pct.toFixed(1) + " %)" +
        (info.status === "failed" ? ", failed" : running(info) ? ", rendering…" : ", complete"));
      bar.hidden = false;
      $("bar-fill").style.width = Math.min(100, pct) + "%";
    } else {
      set("f-progress", info.tiles_done ? info.tiles_done + " tiles done" : null);
      bar.hidden = true;
    }
    $("meta").textContent = JSON.stringify(info.meta || {}, null, 2);
    if (info.status === "failed") status("render failed: " + (info.error || "see the job's log") + " (re-run to resume)");
    if (info.export && info.export.state !== "current") status("this export is " + info.export.state + ": " + info.export.reason);
  }

  function showEndless(s) {
    if (!s) return;
    set("f-progress", s.tiles_rendered + " rendered · " + s.tiles_from_cache + " from cache" +
      (s.tiles_damaged ? " · " + s.tiles_damaged + " damaged in the cache (rendered again)" : "") +
      (s.tiles_abandoned ? " · " + s.tiles_abandoned + " abandoned" : "") +
      " · server: " + s.rendering + " rendering, " + s.queued + " queued");
    const last = s.last_tile;
    set("f-last", last ? last.ms.toFixed(0) + " ms (" + (last.source === "rendered" ? "rendered" : "from cache") +
      ", tile " + last.tile[0] + "/" + last.tile[1] + "_" + last.tile[2] + ")" : null);
    $("f-engine").textContent = s.engine;
  }

  // Open the new version above the old one; remove the old one when the new one is fully loaded.
  function swapTo(info) {
    swapping = true;
    const previous = version;
    version = info.version;
    viewer.addTiledImage({
      tileSource: sourceUrl(info),
      index: viewer.world.getItemCount(),
      success: (e) => {
        const item = e.item;
        let finished = false;
        const finish = () => {
          if (finished) return;
          finished = true;
          for (let i = viewer.world.getItemCount() - 1; i >= 0; i--) {
            const other = viewer.world.getItemAt(i);
            if (other !== item) viewer.world.removeItem(other);
          }
          swapping = false;
          hooks.swaps += 1;
        };
        if (item.getFullyLoaded()) finish();
        else {
          item.addHandler("fully-loaded-change", (ev) => { if (ev.fullyLoaded) finish(); });
          setTimeout(finish, 15000);
        }
      },
      error: () => { version = previous; swapping = false; },
    });
  }

  async function fetchInfo() {
    const r = await fetch("/api/info", { cache: "no-store" });
    if (!r.ok) throw new Error("/api/info: HTTP " + r.status);
    return r.json();
  }

  async function poll() {
    let info = hooks.info;
    try {
      info = await fetchInfo();
      hooks.info = info;
      showInfo(info);
      if (info.status !== "failed") status("");
      if (version === null) {
        version = info.version;
        if (info.mode === "endless") {
          document.body.classList.add("endless");
          loader.install();
          viewer.placeholderFillStyle = hatch;  // the image area until its first tiles arrive
        }
        viewer.open(sourceUrl(info));
      } else if (info.mode === "zarr" && info.version !== version && !swapping) {
        swapTo(info);
      }
    } catch (err) {
      status("server unreachable: " + err.message);
    }
    const endless = info && info.mode === "endless";
    setTimeout(poll, endless ? POLL_ENDLESS_MS : info && running(info) ? POLL_RUNNING_MS : POLL_IDLE_MS);
  }

  $("toggle").addEventListener("click", () => {
    const panel = $("panel");
    panel.classList.toggle("collapsed");
    $("toggle").textContent = panel.classList.contains("collapsed") ? "+" : "–";
  });
  poll();
})();
