"""Why MoSA's compiled training step can differ from the eager one (GPU_PLAN row 12).

Builds the model of ``tests/test_routed_lm.py::test_training_step_compiles_without_graph_breaks[mosa]``,
records the sparse heads' router logits with a forward hook in an eager step and in a
``torch.compile(backend="aot_eager")`` step from the same state, and reports how far the logits
differ, how many scores sit near the 0.5 threshold, and how many picked flags differ when
``mosa_select`` is applied to each run's scores. Flags that flip on a rounding-sized logit
difference mean the test compares two legitimately different routings.

    PYTHONPATH=src python benchmarks/probe_mosa_compile.py --out probe.json
"""

import argparse
import json

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

    def run(fn):
        logits.clear()
        model.zero_grad(set_to_none=True)
        loss = fn(ids)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, list(logits)

    run(step)  # first use, as in the test
    state = {n: t.clone() for n, t in model.state_dict().items()}
    want_loss, want, eager_logits = run(step)
    model.load_state_dict(state)
    torch._dynamo.reset()
    got_loss, got, compiled_logits = run(torch.compile(step, backend="aot_eager"))
    rows = []
    for layer, a, b in zip(layers, eager_logits, compiled_logits):
        sa, sb = torch.sigmoid(a).transpose(1, 2), torch.sigmoid(b).transpose(1, 2)
        _, pa = mosa_select(sa, layer.sparsity, layer.selection, layer.capacity)
        _, pb = mosa_select(sb, layer.sparsity, layer.selection, layer.capacity)
        rows.append(dict(logit_max_abs_diff=float((a - b).abs().max()),
                         scores_within_1e3_of_half=int(((sa - 0.5).abs() < 1e-3).sum()),
                         candidate_flags_differ=int(((sa > 0.5) != (sb > 0.5)).sum()),
                         picked_flags_differ=int((pa != pb).sum()), picked=int(pa.sum()), slots=pa.numel()))
    grad_rows = {n: dict(max_abs=float((got[n] - want[n]).abs().max()),
                         differ=int((~torch.isclose(got[n], want[n], rtol=1e-4, atol=1e-5)).sum()),
                         numel=want[n].numel()) for n in want}
    result = dict(machine=machine_header(), command=command_line(), loss_eager=float(want_loss), loss_compiled=float(got_loss),
                  logged_router_calls=[len(eager_logits), len(compiled_logits)], layers=rows,
                  grads={n: r for n, r in grad_rows.items() if r["differ"]})
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
