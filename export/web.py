"""A static web page that runs an ONNX export in the browser: `edge-mla web ONNX_DIR --out SITE`.

SITE holds index.html and app.js (the greedy loop of edge-mla's runner on onnxruntime-web's WebAssembly build), the
JS libraries copied from the npm packages pinned in web/package-lock.json (onnxruntime-web, and
@huggingface/tokenizers for tokenizer.json; installed once with `npm ci` into edge-mla's cache, never loaded from a
CDN), their licenses, a service worker that keeps every file for offline use, and the export itself under model/.
The WASM build runs the export's graph as it is: MatMulNBits, GatherBlockQuantized, RotaryEmbedding,
SkipSimplifiedLayerNormalization and GroupQueryAttention with the int8/int4 cache (the LatentAttention function is
inlined at load). A browser cannot bind one buffer to past and present, so the page feeds each step's present
back as the next past (the cache is copied once per step; GQA appends to the copy).
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from edge_mla.publish import refuse_existing, staged_folder
from edge_mla.runtimes.onnxruntime import META, read_meta

if TYPE_CHECKING:
    import onnx  # imported where used: `edge-mla` builds its parser without it

TEMPLATE = Path(__file__).parent / "web"
PAGE_FILES = ("index.html", "app.js", "sw.js")
VENDOR = {  # npm package -> (folder in SITE/vendor, files it needs)
    "onnxruntime-web": ("onnxruntime-web", ["dist/ort.wasm.min.mjs", "dist/ort-wasm-simd-threaded.mjs",
                                            "dist/ort-wasm-simd-threaded.wasm"]),
    "@huggingface/tokenizers": ("tokenizers", ["dist/tokenizers.min.mjs"]),
}
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", META)
WEIGHTS = ("float16", "as-exported")
MIT = """Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation the
rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to
permit persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of the
Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE
WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def add_arguments(parser) -> None:
    parser.add_argument("folder", help="ONNX export folder (edge-mla export onnx, or a build's onnx/)")
    parser.add_argument("-o", "--out", required=True, help="site folder to write")
    parser.add_argument("--weights", default="float16", choices=WEIGHTS,
                        help="float16: 4/8-bit MatMulNBits weights dequantized (the WASM build's float GEMM decodes "
                             "~6x faster than its MatMulNBits; ~2.5x the download); as-exported: the export's files")
    parser.add_argument("--serve", type=int, default=None, metavar="PORT",
                        help="then serve the site on 127.0.0.1:PORT with the headers that allow WASM threads")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def npm_packages() -> Path:
    """node_modules of web/package-lock.json, installed once (npm ci) into edge-mla's cache."""
    lock = (TEMPLATE / "package-lock.json").read_bytes()
    cache = Path(os.environ.get("EDGE_MLA_CACHE", Path.home() / ".cache" / "edge-mla"))
    folder = cache / "npm" / hashlib.sha256(lock).hexdigest()[:16]
    if (folder / "node_modules").is_dir():
        return folder / "node_modules"
    npm = shutil.which("npm")
    if npm is None:
        raise ValueError("edge-mla web copies onnxruntime-web from npm, and npm is not installed: install Node.js "
                         "with npm (Debian: apt-get install npm), then run the command again")
    with staged_folder(folder) as staging:
        for name in ("package.json", "package-lock.json"):
            shutil.copy(TEMPLATE / name, staging / name)
        done = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                              cwd=staging, capture_output=True, text=True)
        if done.returncode != 0:
            raise ValueError(f"npm ci failed (is the npm registry reachable?):\n{done.stderr.strip()[-2000:]}")
    return folder / "node_modules"


def licenses(modules: Path) -> str:
    parts = []
    for package in VENDOR:
        info = json.loads((modules / package / "package.json").read_text())
        text = modules / package / "LICENSE"
        body = text.read_text() if text.exists() else \
            f"{info['license']} License\n\nCopyright (c) Microsoft Corporation\n\n{MIT}"
        parts.append(f"{package} {info['version']} ({info['license']}), files under vendor/{VENDOR[package][0]}/\n\n"
                     f"{body.strip()}\n")
    return ("Third-party software in this site, copied from the npm packages named (edge-mla's own files: "
            "Apache-2.0).\nThe model under model/ carries its own license (see its source).\n\n" +
            "\n" + "=" * 80 + "\n\n".join(parts))


def runs(meta: dict) -> str:
    """What the page runs, in words."""
    cache = meta["cache"]
    if meta["architecture"] != "mla":
        return f"original model, GroupQueryAttention, {cache['dtype']} K/V cache"
    body = "GroupQueryAttention body" if meta.get("attention_body", "gqa") == "gqa" else "plain-ops (matmul) body"
    return f"MLA: LatentAttention ({body}), {cache['dtype']} latent cache of {cache['bytes_per_token']} B/token"


def dequantized_weights(model: onnx.ModelProto, dtype: str = "float16") -> tuple[onnx.ModelProto, int]:
    """Every MatMulNBits as MatMul over its dequantized weight stored as `dtype` (onnxruntime casts float16 to float32
    once, at load): the same quantized values, computed by the WASM build's float GEMM, which is ~6x faster than its
    MatMulNBits (docs/phones.md). float32 is exact; float16 rounds each weight to 11 bits. Returns the model and the
    count of weights replaced."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    def unpack(packed, bits: int):
        """uint8 bytes -> codes, low bits first (MatMulNBits' and its zero points' packing)."""
        if bits == 8:
            return packed.astype(np.int32)
        return np.stack([packed & 0x0F, packed >> 4], -1).reshape(*packed.shape[:-1], -1).astype(np.int32)

    init = {i.name: i for i in model.graph.initializer}
    nodes, dropped, count = [], set(), 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        K, N, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
        inputs = list(node.input) + [""] * (6 - len(node.input))
        if inputs[4] or any(n and n not in init for n in inputs[1:4]):
            raise ValueError(f"{node.name}: MatMulNBits with g_idx or computed weights cannot be dequantized")
        codes = unpack(numpy_helper.to_array(init[inputs[1]]), bits).reshape(N, -1, block)  # [N, blocks, block]
        blocks = codes.shape[1]
        scales = numpy_helper.to_array(init[inputs[2]]).astype(np.float32).reshape(N, blocks)
        if not inputs[3]:
            zero = np.full((N, blocks), 2 ** (bits - 1), np.float32)
        else:
            z = numpy_helper.to_array(init[inputs[3]])
            zero = (z.astype(np.float32) if z.dtype != np.uint8 else
                    unpack(z.reshape(N, -1), bits)[:, :blocks].astype(np.float32)).reshape(N, blocks)
        weight = ((codes - zero[..., None]) * scales[..., None]).reshape(N, -1)[:, :K]
        name = f"{inputs[1]}.{dtype}"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T).astype(dtype), name))
        cast = helper.make_node("Cast", [name], [name + "/float"], name=node.name + "/cast", to=onnx.TensorProto.FLOAT)
        out = node.output[0] if not inputs[5] else node.output[0] + "/nobias"
        nodes += [cast, helper.make_node("MatMul", [inputs[0], name + "/float"], [out], name=node.name)]
        if inputs[5]:
            nodes.append(helper.make_node("Add", [out, inputs[5]], [node.output[0]], name=node.name + "/bias"))
        dropped.update(n for n in inputs[1:4] if n)
        count += 1
    used = {n for node in nodes for n in node.input}
    keep = [i for i in model.graph.initializer if i.name not in dropped or i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model, count


def build_site(folder: str | Path, out: str | Path, weights: str = "float16", overwrite: bool = False) -> Path:
    """Write the site for the export in `folder` at `out`, all or nothing. `weights`: "float16" stores MatMulNBits
    weights dequantized (fast in the browser, a larger download), "as-exported" copies the export's model files."""
    folder, out = Path(folder), Path(out)
    meta = read_meta(folder)
    if weights not in WEIGHTS:
        raise ValueError(f"--weights {weights} is not supported: choose one of {', '.join(WEIGHTS)}")
    refuse_existing(out, overwrite)
    missing = [f for f in (meta["model"], *MODEL_FILES) if not (folder / f).exists()]
    if missing:
        raise ValueError(f"{folder} lacks {', '.join(missing)}: re-export it with `edge-mla export onnx`")
    if meta["cache"].get("attention_body") == "matmul":  # the page feeds a growing cache, not an in-place buffer
        raise ValueError(f"{folder} has the matmul attention body, whose cache is a preallocated in-place buffer; "
                         "the page feeds a growing cache: re-export with `edge-mla export onnx --attention gqa`")
    modules = npm_packages()
    with staged_folder(out) as site:
        for name in PAGE_FILES:
            shutil.copy(TEMPLATE / name, site / name)
        for package, (target, files) in VENDOR.items():
            (site / "vendor" / target).mkdir(parents=True)
            for f in files:
                shutil.copy(modules / package / f, site / "vendor" / target / Path(f).name)
        (site / "THIRD_PARTY_LICENSES.txt").write_text(licenses(modules))
        (site / "model").mkdir()
        for name in MODEL_FILES:
            shutil.copy(folder / name, site / "model" / name)
        converted = 0
        if weights == "float16":
            import onnx

            model, converted = dequantized_weights(onnx.load(str(folder / meta["model"])))
            if converted:
                onnx.save_model(model, str(site / "model" / meta["model"]), save_as_external_data=True,
                                all_tensors_to_one_file=True, location=meta["model"] + ".data", size_threshold=1024)
                meta["weights"]["web"] = (f"{converted} MatMulNBits weights dequantized to float16 for the "
                                          "browser (edge-mla web --weights float16)")
                (site / "model" / META).write_text(json.dumps(meta, indent=1))
        if not converted:
            for f in [meta["model"], *(f.name for f in folder.glob(meta["model"] + ".data*"))]:
                shutil.copy(folder / f, site / "model" / f)
        external = sorted(f.name for f in (site / "model").glob(meta["model"] + ".data*"))
        files = sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file())
        (site / "site.json").write_text(json.dumps({
            "title": f"{meta.get('source') or folder.name} ({meta['architecture']})", "runs": runs(meta),
            "weights": meta["weights"].get("web", f"as exported ({meta['weights'].get('format')})"),
            "external_data": external, "files": files + ["site.json"]}, indent=1))
    return out


class Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with the headers that make the page cross-origin isolated (WASM threads need them); a POST
    stores its body in `server.reports` (the page's `?report=` result). With `server.offline` set, GET requests get
    no answer (the connection is dropped, as when the network is down) while reports still arrive."""

    def do_GET(self):
        if self.server.offline:
            self.close_connection = True
            return
        super().do_GET()

    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.reports.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def serve(site: str | Path, port: int = 0) -> http.server.ThreadingHTTPServer:
    """Serve `site` on 127.0.0.1 (port 0: any free port) in a background thread; `.shutdown()` stops it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), partial(Handler, directory=str(site)))
    server.reports, server.offline = [], False
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(args) -> int:
    out = build_site(args.folder, args.out, weights=args.weights, overwrite=args.force)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}/ ({size / 1e6:.1f} MB): open index.html through any static web server")
    if args.serve is not None:
        server = serve(out, args.serve)
        print(f"serving http://127.0.0.1:{server.server_address[1]}/?prompt=The%20capital%20of%20France%20is"
              "&tokens=32 (Ctrl-C stops)")
        try:
            threading.Event().wait()
        finally:
            server.shutdown()
    return 0


def headless_run(site: str | Path, query: dict, timeout: float = 300, browser: str | None = None,
                 profile: str | Path | None = None, offline: bool = False, server=None) -> dict:
    """Load the page in headless Chromium with `query` (prompt, tokens, threads, ...) and return what it reports:
    prompt_ids, tokens, text, tokens_per_second, ... (tests and benchmarks/phones.py drive the page this way).

    `profile`: a browser profile folder to keep between runs; with one, the page also installs its service worker
    before reporting (offline_ready). `offline`: the server answers no file request, as when the network is down
    (give the same `server` and `profile` as the run that installed the worker)."""
    import tempfile
    import time
    from urllib.parse import urlencode

    browser = browser or shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise ValueError("no Chromium found: apt-get install chromium (Debian), or pass its path")
    own_server = server is None
    server = server or serve(site)
    server.reports.clear()
    server.offline = offline
    query = {**query, "report": "/report", **({} if profile else {"offline": "0"})}
    url = f"http://127.0.0.1:{server.server_address[1]}/?" + urlencode(query)
    with tempfile.TemporaryDirectory() as scratch:
        proc = subprocess.Popen([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--disable-extensions", f"--user-data-dir={profile or scratch}",
                                 "--remote-debugging-port=0", url],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + timeout
            while not server.reports and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
        finally:
            proc.terminate()
            try:
                _, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if own_server:
                server.shutdown()
                server.server_close()
    if not server.reports:
        raise RuntimeError(f"the page reported nothing within {timeout} s; Chromium said:\n{(err or '')[-3000:]}")
    return server.reports[0]
