"""Parity with AdapterHub itself: our files load in `adapters` and compute our logits, and back.

Not a test (it needs the `adapters` library, which pins transformers 4.57): run it with
`bash benchmarks/adapterhub_parity.sh`, which builds benchmarks/.work/ahvenv and calls
  python benchmarks/adapterhub_parity.py ours       (project venv: fixtures, our adapters, our logits)
  ahvenv/python benchmarks/adapterhub_parity.py hub (adapters: load ours, compare; save its own)
  python benchmarks/adapterhub_parity.py back       (project venv: read AdapterHub's, compare)
Everything lives in benchmarks/.work/parity/.
"""

from __future__ import annotations

import json
import os
import sys

import torch

W = os.path.abspath(os.path.join(os.path.dirname(__file__), ".work", "parity"))
CASES = [("gpt2", "houlsby"), ("gpt2", "pfeiffer"), ("llama", "houlsby"), ("llama", "pfeiffer"),
         ("t5", "houlsby"), ("t5", "pfeiffer")]
HUB_NAME = {"houlsby": "double_seq_bn", "pfeiffer": "seq_bn"}
IDS = torch.tensor([[5, 17, 9, 40, 2, 77, 31, 8]])


def run(model):
    kw = {"decoder_input_ids": IDS[:, :5]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits


def load_model(path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = AutoConfig.from_pretrained(path)
    cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(path).float().eval()


def ours():
    """Build fixtures, hook random adapters, save AdapterHub dirs + our logits."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fixtures import build_model
    from surgery.arch import load_arch
    from surgery.io.adapterhub import adapterhub_config, bn_config, write_adapterhub
    from surgery.io.writer import OutputDir
    from surgery.train.bottleneck import attach_bottleneck

    os.makedirs(W, exist_ok=True)
    for fam in sorted({f for f, _ in CASES}):
        if not os.path.exists(os.path.join(W, fam)):
            build_model(fam, os.path.join(W, fam), tokenizer=False)
    for fam, kind in CASES:
        m = load_model(os.path.join(W, fam))
        arch = load_arch(m.config.to_dict())
        bn = bn_config(kind, reduction_factor=8, cross_adapter=fam == "t5" and kind == "houlsby")
        mods = attach_bottleneck(m, arch, bn, init="bert", seed=11)
        with torch.no_grad():  # non-zero biases too, so their keys and placement matter
            for p in mods.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        torch.save(run(m), os.path.join(W, f"{fam}-{kind}-ours.pt"))
        od = OutputDir(os.path.join(W, f"{fam}-{kind}-ours"), force=True)
        write_adapterhub(od, adapterhub_config("task", bn, m.config.to_dict(), arch.dims["hidden"],
                                               os.path.join(W, fam)), mods.site_weights())
        od.commit()
        mods.detach()


def hub():
    """In the adapters venv: load our dirs and compare logits; save AdapterHub's own adapters."""
    import adapters

    report = {}
    for fam, kind in CASES:
        m = load_model(os.path.join(W, fam))
        base = run(m)
        adapters.init(m)
        info = {}
        name = m.load_adapter(os.path.join(W, f"{fam}-{kind}-ours"), loading_info=info)
        m.set_active_adapters(name)
        want = torch.load(os.path.join(W, f"{fam}-{kind}-ours.pt"))
        got = run(m)
        report[f"{fam}-{kind} ours->adapters"] = {
            "max_abs_diff": float((got - want).abs().max()), "adapter_effect": float((got - base).abs().max()),
            "missing": info.get("missing_keys"), "unexpected": info.get("unexpected_keys")}
        # and AdapterHub's own adapter, saved by save_adapter, for the reverse check
        m2 = load_model(os.path.join(W, fam))
        adapters.init(m2)
        m2.add_adapter("hubtask", config=HUB_NAME[kind])
        with torch.no_grad():
            for n, p in m2.named_parameters():
                if ".adapters.hubtask." in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + 1)))
        m2.set_active_adapters("hubtask")
        torch.save(run(m2), os.path.join(W, f"{fam}-{kind}-hub.pt"))
        m2.save_adapter(os.path.join(W, f"{fam}-{kind}-hub"), "hubtask")
    with open(os.path.join(W, "hub_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


def back():
    """Project venv: read AdapterHub's saved adapters, hook them, compare with its logits."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from surgery.arch import load_arch
    from surgery.kinds.bottleneck import read_adapterhub
    from surgery.train.bottleneck import attach_bottleneck

    report = {}
    for fam, kind in CASES:
        m = load_model(os.path.join(W, fam))
        base = run(m)
        ad = read_adapterhub(os.path.join(W, f"{fam}-{kind}-hub"))
        mods = attach_bottleneck(m, load_arch(m.config.to_dict()), ad.bn, weights=ad.modules, name=ad.name)
        want = torch.load(os.path.join(W, f"{fam}-{kind}-hub.pt"))
        got = run(m)
        report[f"{fam}-{kind} adapters->ours"] = {"max_abs_diff": float((got - want).abs().max()),
                                                  "adapter_effect": float((got - base).abs().max()), "sites": len(ad.modules),
                                                  "files": sorted(os.listdir(ad.path))}
        mods.detach()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    {"ours": ours, "hub": hub, "back": back}[sys.argv[1]]()
