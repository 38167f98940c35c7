// The search page (served by mimic-engine at /). No framework, no build step.
// Every string from the index is put into the page with textContent, never as markup.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("search"), q = $("q"), qLabel = $("q-label"), k = $("k"), modality = $("modality");
  const file = $("file"), drop = $("drop"), preview = $("preview"), previewImg = $("preview-img");
  const status = $("status"), results = $("results");
  const initial = JSON.parse($("initial-state").textContent);
  const QUERY_PLACEHOLDER = q.placeholder;
  let image = null; // the query image: {dataUrl, name}, or null

  k.max = String(initial.max_k);

  // an element with text (set as text, never parsed), a class and attributes, and children
  function el(tag, props, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }

  function setStatus(text, isError) {
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  // ---- the URL holds a text search: /?q=...&modality=...&k=... ----
  function readUrl() {
    const p = new URLSearchParams(location.search);
    return { q: p.get("q") || "", modality: p.get("modality") || "", k: p.get("k") || String(initial.default_k) };
  }

  function fillForm(s) {
    q.value = s.q;
    modality.value = s.modality === "text" || s.modality === "image" ? s.modality : "";
    k.value = s.k;
  }

  function urlFor(s) {
    const p = new URLSearchParams({ q: s.q });
    if (s.modality) p.set("modality", s.modality);
    if (s.k && s.k !== String(initial.default_k)) p.set("k", s.k);
    return "/?" + p.toString();
  }

  // ---- results ----
  function thumbnailUrl(id) {
    return "/v1/documents/" + encodeURIComponent(id) + "/thumbnail";
  }

  function shown(value) {
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  // an uploaded image's ref is its sha256: the first 12 hex name it well enough on a card
  function shortRef(ref) {
    return /^inline:[0-9a-f]{64}$/.test(ref) ? ref.slice(0, 19) + "…" : ref;
  }

  function card(hit) {
    const li = el("li", { class: "card " + hit.modality, "data-id": hit.id });
    if (hit.modality === "image") {
      const img = el("img", { src: thumbnailUrl(hit.id), alt: hit.caption || "image document " + hit.id, decoding: "async" });
      const frame = el("div", { class: "thumb" }, [img]);
      img.addEventListener("load", () => img.classList.toggle("pixelated", img.naturalWidth < 96));
      img.addEventListener("error", () => frame.replaceChildren(el("span", { class: "no-thumb", text: "no preview stored" })));
      li.appendChild(frame);
      if (hit.caption) li.appendChild(el("p", { class: "caption", text: hit.caption }));
    } else {
      li.appendChild(el("p", { class: "doc-text", text: hit.text || "" }));
    }
    li.appendChild(el("div", { class: "line" }, [
      el("span", { class: "score", text: hit.score.toFixed(4), title: "similarity (cosine)" }),
      el("span", { class: "badge", text: hit.modality }),
      el("code", { class: "id", text: hit.id }),
    ]));
    const meta = Object.entries(hit.metadata || {});
    if (hit.image_ref) meta.push(["image_ref", hit.image_ref]);
    if (meta.length) {
      const dl = el("dl", { class: "metadata" });
      for (const [key, value] of meta) {
        const text = key === "image_ref" ? shortRef(value) : shown(value);
        dl.append(el("dt", { text: key }), el("dd", { text: text, title: shown(value) }));
      }
      li.appendChild(dl);
    }
    return li;
  }

  function show(found, seconds) {
    if (found.error) {
      results.replaceChildren();
      setStatus(found.error, true);
      return;
    }
    results.replaceChildren(...found.results.map(card));
    const n = found.results.length;
    let text = n ? n + (n === 1 ? " result" : " results") : "No results: the index holds no document of that modality.";
    if (n && seconds != null) text += " in " + Math.round(seconds * 1000) + " ms";
    if (found.truncated) text += "; the query was cut to the model's length";
    setStatus(text);
  }

  async function search(s, queryImage) {
    const query = queryImage ? { image: queryImage.dataUrl } : { text: s.q };
    if (queryImage && s.q.trim()) query.text = s.q;
    const body = { query: query, k: Number(s.k) || initial.default_k, modality: s.modality || null };
    setStatus("Searching…");
    form.setAttribute("aria-busy", "true");
    const start = performance.now();
    try {
      const response = await fetch("/v1/search", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      const data = await response.json().catch(() => ({}));
      if (response.ok) show(data, (performance.now() - start) / 1000);
      else show({ error: (data.error && data.error.message) || "the server answered " + response.status });
    } catch (err) {
      show({ error: "the server could not be reached (" + err.message + ")" });
    } finally {
      form.removeAttribute("aria-busy");
    }
  }

  function current() {
    return { q: q.value, modality: modality.value, k: k.value };
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const s = current();
    if (!image && !s.q.trim()) {
      setStatus("Type a query or add an image.", true);
      q.focus();
      return;
    }
    if (!image) history.pushState(s, "", urlFor(s)); // an image does not fit in a link
    search(s, image);
  });

  window.addEventListener("popstate", () => {
    clearImage();
    const s = readUrl();
    fillForm(s);
    if (s.q.trim()) search(s, null);
    else {
      results.replaceChildren();
      setStatus("");
    }
  });

  // ---- the query image: file picker, drag and drop, paste ----
  function setImage(picked) {
    if (!picked || (picked.type && !picked.type.startsWith("image/"))) {
      setStatus("That is not an image file; choose a PNG, JPEG, WebP, GIF or BMP.", true);
      return;
    }
    const reader = new FileReader();
    reader.onload = () => {
      image = { dataUrl: reader.result, name: picked.name || "pasted image" };
      previewImg.src = image.dataUrl;
      $("preview-name").textContent = image.name;
      preview.hidden = false;
      qLabel.textContent = "Caption (optional)";
      q.placeholder = "words about the image, or leave empty";
      search(current(), image);
    };
    reader.onerror = () => setStatus("Could not read that file.", true);
    reader.readAsDataURL(picked);
  }

  function clearImage() {
    image = null;
    file.value = "";
    preview.hidden = true;
    previewImg.removeAttribute("src");
    qLabel.textContent = "Query";
    q.placeholder = QUERY_PLACEHOLDER;
  }

  file.addEventListener("change", () => setImage(file.files[0]));
  $("clear-image").addEventListener("click", () => {
    clearImage();
    setStatus("Image removed.");
    q.focus();
  });
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) drop.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    if (event.dataTransfer && event.dataTransfer.files.length) setImage(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const items = Array.from((event.clipboardData && event.clipboardData.items) || []);
    const pasted = items.find((item) => item.kind === "file" && item.type.startsWith("image/"));
    if (pasted) {
      event.preventDefault();
      setImage(pasted.getAsFile());
    }
  });

  // ---- on load: the URL's search, whose results the server embedded in the page ----
  const start = readUrl();
  fillForm(start);
  history.replaceState(start, "", location.href);
  if (initial.search) show(initial.search);
  else if (start.q.trim()) search(start, null);
})();
