"""Run under `torch.distributed.run --standalone --nproc_per_node 2`: an MoE HSALM sharded with FSDP2
(fully_shard per block, then the root), each rank on its own batch, must give the gradients and
balancing-bias update of the unsharded model on both batches."""
import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

sys.path.insert(0, sys.argv[2])  # tests/, for conftest's builders
from conftest import build_model  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    ref = build_model(ffn=("MoE", {"experts": 4, "active": 2, "expert_hidden": 16, "bias_update_rate": 0.1}),
                      dtype=torch.float32).train()
    sharded = copy.deepcopy(ref)
    for block in sharded.blocks:
        fully_shard(block)
    fully_shard(sharded)
    register_fsdp_forward_method(sharded, "loss")  # loss() is an entry point besides forward()
    batches = [torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(r)) for r in range(2)]
    results = {}
    for name, model in (("ref", ref), ("sharded", sharded)):
        # the unsharded reference sees both ranks' batches; each sharded rank only its own
        x = torch.cat(batches) if name == "ref" else batches[rank]
        nll, n = model.loss(x, x)
        (nll / n).backward()
        for ffn in model.routed_ffns():
            ffn.after_optimizer_step()  # sharded: the all-reduced load is the load of both batches
        grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for k, p in
                 model.named_parameters()}
        biases = [f.routing_bias.clone() for f in model.routed_ffns()]
        results[name] = (float(nll / n), grads, biases)
    loss_err = abs(results["ref"][0] - results["sharded"][0])
    grad_err = max((results["ref"][1][k] - g).abs().max().item() for k, g in results["sharded"][1].items())
    bias_equal = all(torch.equal(a, b) for a, b in zip(results["ref"][2], results["sharded"][2]))
    moved = any(b.abs().sum() > 0 for b in results["sharded"][2])
    expert_grad = sum(g.norm().item() for k, g in results["sharded"][1].items() if k.endswith("w_gate"))
    sharded_experts = [tuple(p.to_local().shape) for n_, p in sharded.named_parameters() if n_.endswith("w_gate")]
    with open(f"{sys.argv[1]}.rank{rank}.json", "w") as f:
        json.dump({"loss_err": loss_err, "grad_err": grad_err, "bias_equal": bias_equal, "moved": bool(moved), "expert_grad": expert_grad,
                   "local_w_gate": sharded_experts,
                   "bias": [b.tolist() for b in results["sharded"][2]]}, f)
    dist.barrier()  # neither rank tears gloo down while the other may still be reading from it
    dist.destroy_process_group()
    # Gloo's worker threads may still hold work objects whose tensors get freed while the interpreter shuts
    # down, which aborts the process now and then (1 run in 25 here; pytorch/pytorch#179291). The results
    # are written, so leave without the interpreter's finalisation.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
