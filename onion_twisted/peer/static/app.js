// The peer's page: polls /api/status every second and asks for downloads.
// Everything from the network (file names, errors) goes into the page as text
// (textContent), never as HTML. No inline handlers, nothing from elsewhere.
(function () {
  "use strict";

  var POLL_MS = 1000;
  var UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

  var timer = null;
  var inFlight = false;
  var again = false;
  var statusSeq = 0;          // number of the latest /api/status request started
  var pending = null;         // {name, after}: the download this page asked for last
  var datalistKey = null;

  function $(id) { return document.getElementById(id); }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  function setText(node, text) {
    text = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== text) { node.textContent = text; }
  }

  function setAttr(node, name, value) {
    if (value === null || value === undefined) {
      if (node.hasAttribute(name)) { node.removeAttribute(name); }
    } else if (node.getAttribute(name) !== String(value)) {
      node.setAttribute(name, String(value));
    }
  }

  function isNumber(n) { return typeof n === "number" && isFinite(n); }

  function human(n) {
    if (!isNumber(n) || n < 0) { return "?"; }
    var i = 0;
    while (n >= 1024 && i < UNITS.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? String(Math.round(n)) : n.toFixed(n < 10 ? 2 : 1)) + " " + UNITS[i];
  }

  function speed(bps) { return isNumber(bps) && bps > 0 ? human(bps) + "/s" : ""; }

  function age(seconds) {
    if (!isNumber(seconds)) { return "–"; }
    seconds = Math.max(0, Math.floor(seconds));
    var h = Math.floor(seconds / 3600), m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
    return (h ? h + " h " : "") + (h || m ? m + " min " : "") + s + " s";
  }

  function list(value) { return Array.isArray(value) ? value : []; }

  // Keep one element per key: update it in place, so a button under the
  // pointer is never replaced between the press and the click.
  function reconcile(container, items, keyOf, create, update) {
    var existing = new Map();
    Array.prototype.forEach.call(container.children, function (child) {
      existing.set(child.dataset.key, child);
    });
    var seen = new Set();
    var wanted = [];
    items.forEach(function (item) {
      var key = keyOf(item);
      if (seen.has(key)) { return; }
      seen.add(key);
      var node = existing.get(key);
      if (node) {
        existing.delete(key);
      } else {
        node = create(item);
        node.dataset.key = key;
      }
      update(node, item);
      wanted.push(node);
    });
    existing.forEach(function (node) { node.remove(); });
    var inOrder = container.children.length === wanted.length && wanted.every(function (node, i) {
      return container.children[i] === node;
    });
    if (!inOrder) { wanted.forEach(function (node) { container.appendChild(node); }); }
  }

  function showEmpty(emptyId, tableId, isEmpty) {
    $(emptyId).hidden = !isEmpty;
    if (tableId) { $(tableId).hidden = isEmpty; }
  }

  function message(text, kind) {
    var node = $("form-message");
    setText(node, text);
    node.className = "message" + (kind ? " " + kind : "");
  }

  function fileUrl(name) { return "/files/" + encodeURIComponent(name); }

  // --- rendering -----------------------------------------------------------------

  function renderCircuit(circuit) {
    circuit = circuit || {};
    var state = typeof circuit.state === "string" ? circuit.state : "unknown";
    var badge = $("circuit-state");
    setText(badge, state);
    badge.className = "badge state-" + state.replace(/[^a-z]/g, "");
    // The detail says more than the badge, or nothing ("connected" twice says it twice).
    setText($("circuit-detail"), circuit.detail && circuit.detail !== state ? circuit.detail : "");
    setText($("circuit-age"), age(circuit.age));
    reconcile($("circuit-nodes"), list(circuit.nodes), function (n) { return String(n.address); },
      function () {
        var li = el("li");
        li.appendChild(el("span", "address"));
        li.appendChild(document.createTextNode(" "));
        li.appendChild(el("code", "fingerprint"));
        return li;
      },
      function (li, n) {
        setText(li.querySelector(".address"), n.address);
        var fp = typeof n.fingerprint === "string" ? n.fingerprint : "";
        var code = li.querySelector(".fingerprint");
        setText(code, fp ? fp.slice(0, 16) + "…" : "");
        setAttr(code, "title", fp || null);
      });
  }

  function catalogueKey(f) {
    return String(f.name) + "\u0000" + String(f.sha256 || "") + "\u0000" + String(f.root || "");
  }

  // A file this peer shares itself (same name and sha256) gets no Download button:
  // the tracker would find no other source, or fetch a copy of what is already here.
  function renderCatalogue(files, shared) {
    var own = new Set(shared.filter(function (f) { return f && typeof f.sha256 === "string"; })
      .map(catalogueKey));
    files = files.filter(function (f) { return f && typeof f.name === "string"; });
    showEmpty("catalogue-empty", "catalogue-table", files.length === 0);
    setText($("catalogue-count"), files.length ? "(" + files.length + ")" : "");
    reconcile($("catalogue-body"), files, catalogueKey,
      function () {
        var tr = el("tr", "entry");
        tr.appendChild(el("td", "name"));
        tr.appendChild(el("td", "num size"));
        tr.appendChild(el("td", "num sources"));
        var td = el("td", "action");
        var button = el("button", "get", "Download");
        button.type = "button";
        td.appendChild(button);
        td.appendChild(el("span", "yours", "shared by you"));
        tr.appendChild(td);
        return tr;
      },
      function (tr, f) {
        var mine = own.has(catalogueKey(f));
        tr.classList.toggle("own", mine);
        tr.dataset.own = mine ? "1" : "";
        tr.querySelector("button").hidden = mine;
        tr.querySelector(".yours").hidden = !mine;
        tr.dataset.name = f.name;
        if (typeof f.sha256 === "string") { tr.dataset.sha256 = f.sha256; } else { delete tr.dataset.sha256; }
        var name = tr.querySelector(".name");
        setText(name, f.name);
        setAttr(name, "title", typeof f.sha256 === "string" ? "sha256 " + f.sha256 +
          (typeof f.root === "string" ? "\nroot " + f.root + " (end to end, checked chunk by chunk)" : "") : null);
        setText(tr.querySelector(".size"), isNumber(f.size) ? human(f.size) : "?");
        setText(tr.querySelector(".sources"), isNumber(f.sources) ? f.sources : "?");
        setAttr(tr.querySelector("button"), "aria-label", "Download " + f.name);
      });
    var names = Array.from(new Set(files.map(function (f) { return f.name; }))).sort();
    var key = names.join("\u0000");
    if (key !== datalistKey) {
      datalistKey = key;
      var datalist = $("catalogue-names");
      reconcile(datalist, names, function (n) { return n; },
        function (n) { var o = el("option"); o.value = n; return o; },
        function () {});
    }
  }

  // A file shared from the downloads folder (seed_downloads) is marked: the user
  // did not put it in the share folder, this peer shares it on because it downloaded it.
  function renderShared(files) {
    files = files.filter(function (f) { return f && typeof f.name === "string"; });
    showEmpty("shared-empty", "shared-table", files.length === 0);
    setText($("shared-count"), files.length ? "(" + files.length + ")" : "");
    reconcile($("shared-body"), files, function (f) { return f.name; },
      function () {
        var tr = el("tr");
        var name = el("td", "name");
        name.appendChild(el("span", "file-name"));
        name.appendChild(document.createTextNode(" "));
        name.appendChild(el("span", "badge seeding", "seeding (downloaded)"));
        tr.appendChild(name);
        tr.appendChild(el("td", "num size"));
        var td = el("td");
        td.appendChild(el("code", "sha"));
        tr.appendChild(td);
        return tr;
      },
      function (tr, f) {
        setText(tr.querySelector(".file-name"), f.name);
        tr.querySelector(".seeding").hidden = f.seeded !== true;
        tr.classList.toggle("seeded", f.seeded === true);
        setText(tr.querySelector(".size"), isNumber(f.size) ? human(f.size) : "?");
        var code = tr.querySelector(".sha");
        setText(code, typeof f.sha256 === "string" ? f.sha256.slice(0, 12) + "…" : "hashing…");
        setAttr(code, "title", typeof f.sha256 === "string" ? f.sha256 : null);
      });
  }

  function renderDownloads(downloads) {
    downloads = downloads.filter(function (d) { return d && typeof d.file === "string"; }).reverse();
    showEmpty("downloads-empty", null, downloads.length === 0);
    reconcile($("downloads-list"), downloads, function (d) { return d.file; },
      function (d) {
        var li = el("li", "download");
        var head = el("div", "head");
        head.appendChild(el("span", "name"));
        head.appendChild(el("span", "badge state"));
        li.appendChild(head);
        var bar = el("div", "bar");
        var progress = el("progress");
        progress.max = 1;
        progress.setAttribute("aria-label", "Progress of " + d.file);
        bar.appendChild(progress);
        bar.appendChild(el("span", "percent"));
        li.appendChild(bar);
        var meta = el("div", "meta");
        meta.appendChild(el("span", "amount"));
        meta.appendChild(el("span", "speed"));
        li.appendChild(meta);
        li.appendChild(el("p", "privacy"));
        li.appendChild(el("p", "error"));
        var link = el("a", "file-link");
        link.hidden = true;
        li.appendChild(link);
        // A failed download can be asked for again (it keeps the chunks it has) or taken off the list.
        var actions = el("div", "actions");
        actions.hidden = true;
        var retry = el("button", "retry", "Retry");
        retry.type = "button";
        retry.setAttribute("aria-label", "Retry " + d.file);
        var dismiss = el("button", "dismiss", "Dismiss");
        dismiss.type = "button";
        dismiss.setAttribute("aria-label", "Dismiss " + d.file);
        actions.appendChild(retry);
        actions.appendChild(dismiss);
        li.appendChild(actions);
        return li;
      },
      function (li, d) {
        var done = d.state === "done";
        var size = isNumber(d.size) ? d.size : null;
        var bytes = isNumber(d.bytes) ? d.bytes : 0;
        var fraction = done ? 1 : size ? Math.min(bytes / size, 1) : size === 0 ? 0 : null;
        li.className = "download state-" + String(d.state).replace(/[^a-z]/g, "");
        setText(li.querySelector(".name"), d.file);
        setText(li.querySelector(".state"), d.state);
        var progress = li.querySelector("progress");
        // A failed download whose size never came shows no bar: an indeterminate one
        // (moving) would say that something is still going on.
        li.querySelector(".bar").hidden = d.state === "failed" && fraction === null;
        if (fraction === null) {
          setAttr(progress, "value", null);           // indeterminate: size not known yet
        } else if (progress.value !== fraction || !progress.hasAttribute("value")) {
          progress.value = fraction;
        }
        var percent = fraction === null ? "" : Math.floor(fraction * 100) + "%";
        setText(li.querySelector(".percent"), percent);
        setAttr(progress, "aria-valuetext", percent || d.state);
        setText(li.querySelector(".amount"), size === null ? human(bytes) : human(bytes) + " of " + human(size));
        var asked = isNumber(d.transfers) ? d.transfers : 0;
        setText(li.querySelector(".speed"), d.state === "receiving"
          ? speed(d.speed) + (asked > 1 ? " from " + asked + " sources" : "") : "");
        var privacy = li.querySelector(".privacy");
        setText(privacy, privacyText(d));
        privacy.hidden = !privacy.textContent;
        privacy.className = "privacy" + (d.e2e === false || d.unverified ? " weak" : "");
        var error = li.querySelector(".error");
        setText(error, d.error || "");
        error.hidden = !d.error;
        setAttr(error, "role", d.state === "failed" ? "alert" : null);
        li.dataset.file = d.file;
        var actions = li.querySelector(".actions");
        actions.hidden = d.state !== "failed";
        if (actions.hidden) {
          actions.querySelectorAll("button").forEach(function (b) { b.disabled = false; });
        }
        var link = li.querySelector(".file-link");
        link.hidden = !done;
        if (done) {
          var stored = typeof d.path === "string" && d.path ? d.path : d.file;
          setAttr(link, "href", fileUrl(stored));
          setAttr(link, "download", stored);
          setText(link, "Save " + stored);
          setAttr(link, "title", typeof d.sha256 === "string" ? "verified, sha256 " + d.sha256 : null);
        }
      });
  }

  // What the network learnt of a download (§13), never left unsaid: end to end or not,
  // checked chunk by chunk or not, and what its sources sent that was refused.
  function privacyText(d) {
    var parts = [];
    if (d.e2e === true) {
      parts.push("end-to-end encrypted; every chunk checked against the file's root before it was written");
    } else if (d.e2e === false) {
      parts.push("not end-to-end encrypted: the exits of this transfer could read it");
    }
    if (d.state === "done" && d.unverified) { parts.push("unverified: its sharer announced no sha256"); }
    var sources = Array.isArray(d.sources) ? d.sources : [];
    var refused = 0, excluded = 0;
    sources.forEach(function (s) {
      if (s && isNumber(s.refused)) { refused += s.refused; }
      if (s && s.excluded) { excluded += 1; }
    });
    if (refused) { parts.push(refused + " chunk" + (refused === 1 ? "" : "s") + " altered on the way, dropped"); }
    if (excluded) { parts.push(excluded + " source" + (excluded === 1 ? "" : "s") + " sent wrong data and " +
                               (excluded === 1 ? "is" : "are") + " not asked again"); }
    return parts.join("; ");
  }

  function followPending(downloads, seq) {
    if (!pending || seq <= pending.after) { return; }
    var d = downloads.find(function (x) { return x && x.file === pending.name; });
    if (!d) { return; }
    if (d.state === "failed") {
      message(pending.name + ": " + (d.error || "the download failed"), "error");
      pending = null;
    } else if (d.state === "done") {
      message(pending.name + " is downloaded and verified.", "ok");
      pending = null;
    }
  }

  function render(status, seq) {
    renderCircuit(status.circuit);
    renderCatalogue(list(status.catalogue), list(status.shared));
    renderShared(list(status.shared));
    renderDownloads(list(status.downloads));
    followPending(list(status.downloads), seq);
  }

  function connection(ok, text) {
    var node = $("connection");
    setText(node, text);
    node.className = "connection" + (ok ? " ok" : " down");
  }

  // --- talking to the peer -------------------------------------------------------------

  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(poll, ms);
  }

  function poll() {
    if (inFlight) { again = true; return; }
    inFlight = true;
    clearTimeout(timer);
    var seq = ++statusSeq;
    fetch("/api/status", {cache: "no-store", headers: {"Accept": "application/json"}})
      .then(function (response) {
        return response.json().catch(function () { return {}; }).then(function (body) {
          if (!response.ok) {
            throw new Error(body.detail || "the peer answered " + response.status);
          }
          return body;
        });
      })
      .then(function (status) {
        render(status, seq);
        connection(true, "Connected to the peer.");
      })
      .catch(function (e) {
        connection(false, "The peer does not answer: " + (e && e.message ? e.message : e));
      })
      .then(function () {
        inFlight = false;
        if (again) { again = false; schedule(0); } else { schedule(POLL_MS); }
      });
  }

  function startDownload(name, sha256) {
    var body = {file: name};
    if (sha256) { body.sha256 = sha256; }
    message("Asking for " + name + "…", "");
    return fetch("/api/downloads", {
      method: "POST",
      cache: "no-store",
      headers: {"Content-Type": "application/json", "Accept": "application/json"},
      body: JSON.stringify(body)
    }).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (answer) {
        if (response.status === 202) {
          pending = {name: name, after: statusSeq};
          message("Downloading " + name + "…", "ok");
          poll();
          return true;
        }
        message(name + ": " + (answer.detail || answer.error || "the peer answered " + response.status), "error");
        return false;
      });
    }).catch(function (e) {
      message("The peer does not answer: " + (e && e.message ? e.message : e), "error");
      return false;
    });
  }

  function onSubmit(event) {
    event.preventDefault();
    var input = $("file-input");
    var name = input.value.trim();
    if (!name) {
      message("Type the name of a file first.", "error");
      input.focus();
      return;
    }
    var button = $("get-button");
    button.disabled = true;
    startDownload(name, null).then(function (ok) {
      button.disabled = false;
      if (ok) { input.value = ""; }
    });
  }

  function downloadAction(button, name) {
    var retry = button.classList.contains("retry");
    var url = "/api/downloads/" + encodeURIComponent(name) + (retry ? "/retry" : "");
    var options = {method: retry ? "POST" : "DELETE", cache: "no-store", headers: {"Accept": "application/json"}};
    if (retry) {
      options.headers["Content-Type"] = "application/json";
      options.body = "{}";
    }
    button.disabled = true;
    fetch(url, options).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (answer) {
        if (response.ok) {
          if (retry) {
            pending = {name: name, after: statusSeq};
            message("Trying " + name + " again…", "ok");
          } else {
            message(name + " is off the list.", "ok");
          }
        } else {
          button.disabled = false;
          message(name + ": " + (answer.detail || answer.error || "the peer answered " + response.status), "error");
        }
        poll();
      });
    }).catch(function (e) {
      button.disabled = false;
      message("The peer does not answer: " + (e && e.message ? e.message : e), "error");
    });
  }

  function onDownloadsClick(event) {
    var button = event.target.closest ? event.target.closest(".actions button") : null;
    var item = button ? button.closest("li[data-file]") : null;
    if (!item || button.disabled) { return; }
    downloadAction(button, item.dataset.file);
  }

  function onCatalogueClick(event) {
    var row = event.target.closest ? event.target.closest("tr[data-key]") : null;
    if (!row || !row.dataset.name || row.dataset.own) { return; }
    if (event.target.closest("a")) { return; }
    startDownload(row.dataset.name, row.dataset.sha256 || null);
  }

  function init() {
    $("get-form").addEventListener("submit", onSubmit);
    $("catalogue-body").addEventListener("click", onCatalogueClick);
    $("downloads-list").addEventListener("click", onDownloadsClick);
    poll();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
}());
