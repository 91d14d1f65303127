// creps-gigapixel viewer page: OpenSeadragon over /image.dzi (tiles from the
// zarr store, made on the fly) or an exported DZI, plus the job's metadata
// from /api/info. While a render runs, the page polls /api/info and, when
// progress changes, opens the same tile source with a new ?v= on top of the
// old one and drops the old one once the new one has loaded: tiles fill in
// without flashing black. Test hooks live on window.creps.
"use strict";
(function () {
  const POLL_RUNNING_MS = 2000;
  const POLL_IDLE_MS = 15000;
  const hooks = { opened: false, tilesLoaded: 0, tileUrls: [], info: null, swaps: 0 };
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
  viewer.addHandler("open", () => { hooks.opened = true; });
  viewer.addHandler("tile-loaded", (e) => {
    hooks.tilesLoaded += 1;
    if (e.tile && e.tile.getUrl) hooks.tileUrls.push(e.tile.getUrl());
  });
  viewer.addHandler("open-failed", (e) => status("could not open the image: " + (e.message || "error")));

  let version = null;
  let swapping = false;

  function $(id) { return document.getElementById(id); }
  function status(text) { $("status").textContent = text || ""; }
  function set(id, value) { $(id).textContent = value === null || value === undefined ? "–" : String(value); }

  function sourceUrl(info) {
    return info.mode === "zarr" ? info.tile_source + "?v=" + encodeURIComponent(info.version) : info.tile_source;
  }

  function running(info) {
    return info.tiles_total !== null && info.tiles_done !== null && info.tiles_done < info.tiles_total;
  }

  function showInfo(info) {
    const mp = (info.width * info.height) / 1e6;
    const amount = mp >= 1000 ? (mp / 1000).toFixed(2) + " gigapixels" : mp.toFixed(1) + " megapixels";
    set("f-size", info.width + " × " + info.height + " px (" + amount + ")");
    let ckpt = info.checkpoint;
    const sha = info.checkpoint_sha256;
    if (sha && /^[0-9a-f]{64}$/.test(sha)) ckpt = (ckpt ? ckpt + " " : "") + "sha256 " + sha.slice(0, 12) + "…";
    else if (sha && sha !== ckpt) ckpt = (ckpt ? ckpt + " " : "") + "(" + sha + ")";
    set("f-checkpoint", ckpt);
    $("f-checkpoint").title = info.checkpoint_sha256 || "";
    set("f-seed", info.seed);
    set("f-psi", info.psi);
    if (info.mode === "zarr") {
      set("f-levels", info.zarr_levels > 1 ? info.zarr_levels + " zarr levels"
        : "level 0 only (coarse tiles averaged on the fly)");
    } else {
      set("f-levels", "exported DeepZoom (" + info.tile_format + ")");
    }
    const bar = $("bar");
    if (info.tiles_total) {
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
        viewer.open(sourceUrl(info));
      } else if (info.mode === "zarr" && info.version !== version && !swapping) {
        swapTo(info);
      }
    } catch (err) {
      status("server unreachable: " + err.message);
    }
    setTimeout(poll, info && running(info) ? POLL_RUNNING_MS : POLL_IDLE_MS);
  }

  $("toggle").addEventListener("click", () => {
    const panel = $("panel");
    panel.classList.toggle("collapsed");
    $("toggle").textContent = panel.classList.contains("collapsed") ? "+" : "–";
  });
  poll();
})();
