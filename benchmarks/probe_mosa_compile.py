"""Why MoSA's compiled training step can differ from the eager one (GPU_PLAN row 12).

Builds the model of ``tests/test_routed_lm.py::test_training_step_compiles_without_graph_breaks[mosa]``,
records the sparse heads' router logits with a forward hook in an eager step and in a
``torch.compile(backend="aot_eager")`` step from the same state, and reports how far the logits
differ, how many scores sit near the 0.5 threshold, and how many picked flags differ when
``mosa_select`` is applied to each run's scores. Then it repeats the step as variants (eager again;
compiled; the rotary kernel off; SDPA's math backend) and compares every variant's loss and gradients
with a float64 step on the CPU from the same state, which says which of two disagreeing runs is wrong.

    PYTHONPATH=src python benchmarks/probe_mosa_compile.py --out probe.json
"""

import argparse
import contextlib
import json
import os

import torch

from routed.env import command_line, machine_header
from routed.layers.mosa import MoSAAttention, mosa_select
from routed.models.routed_lm import RoutedLMConfig, RoutedLMForCausalLM


def build(device):
    torch.manual_seed(0)
    config = RoutedLMConfig(vocab_size=97, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, attention_types="mosa", attention_block_size=16,
                            max_position_embeddings=128, attention_backend="triton", router_backend="triton",
                            mosa_selection="threshold")
    return RoutedLMForCausalLM(config).to(device).train()


def grads_of(model, ids, fn, logits):
    logits.clear()
    model.zero_grad(set_to_none=True)
    out = fn(ids)
    out.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, list(logits)


def compare(got, want):
    """Per parameter: the largest absolute difference and the elements outside the test's tolerance."""
    rows = {}
    for n in want:
        a, b = got[n].double().cpu(), want[n].double().cpu()
        rows[n] = dict(max_abs=float((a - b).abs().max()), ref_max_abs=float(b.abs().max()),
                       differ=int((~torch.isclose(a, b, rtol=1e-4, atol=1e-5)).sum()), numel=b.numel())
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="probe_mosa_compile.json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(device)
    layers = [m for m in model.modules() if isinstance(m, MoSAAttention)]
    logits = []
    for layer in layers:
        layer.router.register_forward_hook(lambda mod, inp, out: logits.append(out.detach().float().clone()))
    ids = torch.randint(0, 97, (2, 75), generator=torch.Generator().manual_seed(3)).to(device)

    def step(ids):
        out = model(ids, labels=ids)
        return out.loss if out.aux_loss is None else out.loss + out.aux_loss

    grads_of(model, ids, step, logits)  # first use, as in the test
    state = {n: t.clone() for n, t in model.state_dict().items()}

    # The float64 reference on the CPU from the same state (PyTorch backends throughout).
    ref_model = build("cpu").double()
    ref_model.load_state_dict({n: t.double().cpu() if t.is_floating_point() else t.cpu() for n, t in state.items()})
    ref_model.train()

    def ref_step(ids):
        out = ref_model(ids.cpu(), labels=ids.cpu())
        return out.loss if out.aux_loss is None else out.loss + out.aux_loss

    ref_loss, ref_grads, _ = grads_of(ref_model, ids, ref_step, [])

    variants = {}
    for name, rotary, math_sdpa, compiled in [("eager", "1", False, False), ("eager_again", "1", False, False),
                                              ("compiled", "1", False, True),
                                              ("eager_rotary_off", "0", False, False),
                                              ("compiled_rotary_off", "0", False, True),
                                              ("eager_sdpa_math", "1", True, False),
                                              ("compiled_sdpa_math", "1", True, True)]:
        os.environ["ROUTED_ROTARY_KERNEL"] = rotary
        model.load_state_dict(state)
        torch._dynamo.reset()
        fn = torch.compile(step, backend="aot_eager") if compiled else step
        with (torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]) if math_sdpa
              else contextlib.nullcontext()):
            loss, grads, lg = grads_of(model, ids, fn, logits)
        variants[name] = dict(loss=float(loss), loss_minus_ref=float(loss.double().cpu() - ref_loss),
                              grads_vs_ref=compare(grads, ref_grads), logits=lg, grads=grads)
    os.environ.pop("ROUTED_ROTARY_KERNEL")

    eager, compiled = variants["eager"], variants["compiled"]
    rows = []
    for layer, a, b in zip(layers, eager["logits"], compiled["logits"]):
        sa, sb = torch.sigmoid(a).transpose(1, 2), torch.sigmoid(b).transpose(1, 2)
        _, pa = mosa_select(sa, layer.sparsity, layer.selection, layer.capacity)
        _, pb = mosa_select(sb, layer.sparsity, layer.selection, layer.capacity)
        rows.append(dict(logit_max_abs_diff=float((a - b).abs().max()),
                         scores_within_1e3_of_half=int(((sa - 0.5).abs() < 1e-3).sum()),
                         candidate_flags_differ=int(((sa > 0.5) != (sb > 0.5)).sum()),
                         picked_flags_differ=int((pa != pb).sum()), picked=int(pa.sum()), slots=pa.numel()))
    result = dict(machine=machine_header(), command=command_line(), layers=rows,
                  compiled_vs_eager={n: r for n, r in compare(compiled["grads"], eager["grads"]).items()
                                     if r["differ"]},
                  eager_again_vs_eager={n: r for n, r in compare(variants["eager_again"]["grads"],
                                                                 eager["grads"]).items() if r["differ"]},
                  variants={name: dict(loss=v["loss"], loss_minus_ref=v["loss_minus_ref"],
                                       grad_max_abs_vs_float64=max(r["max_abs"] for r in v["grads_vs_ref"].values()),
                                       grads_vs_float64=v["grads_vs_ref"]) for name, v in variants.items()})
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1)[:6000])
    print(f"{'variant':<22} {'loss - float64':>15} {'max |grad - float64|':>21}")
    for name, v in result["variants"].items():
        print(f"{name:<22} {v['loss_minus_ref']:>15.3e} {v['grad_max_abs_vs_float64']:>21.3e}")


if __name__ == "__main__":
    main()
