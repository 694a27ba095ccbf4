"""The status page's screenshot for the README (bench/results/status-page.png), reproducibly.

Serves a tiny random Llama (built from a config, CPU) with the admin and NeMo HTTP ports, runs four jobs
against it for `--seconds`: an EAGLE-3 job with bf16 hidden states and top-k probs, a DSpark job on
layers 0,3,5, a DFlash job (all raw), and a NeMo AutoModel client speaking the HTTP protocol; then opens
the page in headless Chromium (Debian's /usr/bin/chromium + chromedriver, through selenium) and saves
the screenshot.

    python bench/status_screenshot.py                      # about 90 s on 2 cores
    python bench/status_screenshot.py --seconds 30 --out /tmp/status.png
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch

from draftfeed.client.remote import RemoteDFlashTargetModel, RemoteDSparkTargetModel, RemoteEagle3TargetModel
from draftfeed.server.app import TargetServer
from draftfeed.server.config import ServeConfig
from draftfeed.server.nemo_blob import decode_blob, encode_blob

VOCAB = 160


def tiny_llama() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)


def batch(g: torch.Generator, b: int = 4, s: int = 48):
    ids = torch.randint(3, VOCAB, (b, s), generator=g)
    return ids, torch.ones(b, s, dtype=torch.long), torch.ones(b, s, dtype=torch.long)


def vocab_mapping(vd: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(VOCAB, generator=g)[:vd].sort().values
    mask = torch.zeros(VOCAB, dtype=torch.bool)
    mask[ids] = True
    return ids, mask


def grpc_job(backend, stop: threading.Event, pause_s: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with backend:
        while not stop.is_set():
            backend.generate_batch(*batch(g))
            stop.wait(pause_s)


def nemo_job(url: str, stop: threading.Event, pause_s: float, seed: int) -> None:
    """What NeMo's RemoteEagle3TargetModel does: one requests.Session, NMET blobs."""
    http = requests.Session()
    http.trust_env = False
    ids, mask = vocab_mapping(48, seed)
    blob = encode_blob({"selected_token_ids": ids, "selected_token_mask": mask})
    http.post(f"{url}/set_vocab_mapping", data=blob, timeout=60).raise_for_status()
    g = torch.Generator().manual_seed(seed)
    while not stop.is_set():
        ids_, attn, loss = batch(g)
        body = encode_blob({"input_ids": ids_, "attention_mask": attn, "loss_mask": loss})
        r = http.post(f"{url}/generate", data=body, timeout=60)
        r.raise_for_status()
        decode_blob(r.content)
        stop.wait(pause_s)
    http.post(f"{url}/disconnect", data=b"{}", timeout=60)


def screenshot(url: str, out: Path, profile: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        raise SystemExit("needs chromium and chromedriver (apt-get install -y chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        opts.add_argument(flag)
    opts.add_argument("--window-size=1600,1150")
    opts.add_argument(f"--user-data-dir={profile}")
    browser = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    try:
        browser.get(url)
        deadline = time.time() + 30
        while float(browser.execute_script("return document.body.dataset.updates") or 0) < 3:
            if time.time() > deadline:
                raise SystemExit(f"the status page at {url} did not update three times in 30 s")
            time.sleep(0.2)
        out.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(out))
    finally:
        browser.quit()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=75.0, help="how long the jobs run before the screenshot")
    p.add_argument("--out", default="bench/results/status-page.png")
    args = p.parse_args(argv)

    cfg = ServeConfig(port=0, admin_port=0, nemo_http_port=0, data_port=None)
    server = TargetServer(cfg, model=tiny_llama()).start()
    stop = threading.Event()
    eagle = RemoteEagle3TargetModel.from_urls(
        [server.url], job_name="eagle3-run7", encodings={"hidden": "bf16", "probs": "topk:16"}
    )
    eagle.set_vocab_mapping(*vocab_mapping(64, 1))
    jobs = [
        threading.Thread(target=grpc_job, args=(eagle, stop, 0.05, 1)),
        threading.Thread(
            target=grpc_job,
            args=(
                RemoteDSparkTargetModel.from_urls(
                    [server.url], job_name="dspark-ablation-a", target_layer_ids=[0, 3, 5]
                ),
                stop,
                0.2,
                2,
            ),
        ),
        threading.Thread(
            target=grpc_job,
            args=(RemoteDFlashTargetModel.from_urls([server.url], job_name="dflash-baseline"), stop, 0.6, 3),
        ),
        threading.Thread(target=nemo_job, args=(server.nemo_http.url, stop, 0.3, 4)),
    ]
    try:
        for t in jobs:
            t.start()
        time.sleep(args.seconds)
        with tempfile.TemporaryDirectory() as profile:
            screenshot(f"http://127.0.0.1:{server.admin.port}/status", Path(args.out), Path(profile))
        print(f"wrote {args.out}")
    finally:
        stop.set()
        for t in jobs:
            t.join(60)
        server.stop(grace=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
