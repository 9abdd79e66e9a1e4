"""MasterAdamW's block size, warps and cache hints on 1B-shaped weights; a copy's bandwidth for reference."""
import importlib.util, pathlib, sys, torch
sys.path.insert(0, "bench")
from common import timed
import master_adamw_step as probe
import weitiao.train.master_adamw as ma

src = pathlib.Path(ma.__file__).read_text()
hinted = src.replace("mask=mask).to(tl.float32)", "mask=mask, eviction_policy='evict_first').to(tl.float32)")
hinted = hinted.replace("_at + offsets, mask=mask)\n", "_at + offsets, mask=mask, eviction_policy='evict_first')\n")
hinted = hinted.replace("offsets, master, mask=mask)", "offsets, master, mask=mask, cache_modifier='.cs')")
hinted = hinted.replace("offsets, exp_avg, mask=mask)", "offsets, exp_avg, mask=mask, cache_modifier='.cs')")
hinted = hinted.replace("offsets, exp_avg_sq, mask=mask)", "offsets, exp_avg_sq, mask=mask, cache_modifier='.cs')")
hinted = hinted.replace("master.to(tl.bfloat16), mask=mask)", "master.to(tl.bfloat16), mask=mask, cache_modifier='.cs')")
path = pathlib.Path("/tmp/master_adamw_hinted.py"); path.write_text(hinted)
print("hint replacements:", hinted.count("evict_first"), hinted.count(".cs'"))
spec = importlib.util.spec_from_file_location("master_adamw_hinted", path)
mh = importlib.util.module_from_spec(spec); spec.loader.exec_module(mh)

x = torch.empty(1024**3 // 4 * 4, device="cuda"); y = torch.empty_like(x)
ms = timed(lambda: y.copy_(x)); print(f"fp32 copy 4 GiB: {ms:.2f} ms, {2 * x.numel() * 4 / ms / 1e9:.2f} TB/s")
del x, y
weights, masters = probe.masters_of(fp32_gradients=False)
n = sum(w.numel() for w in weights)
for module, name in ((ma, "plain"), (mh, "hinted")):
    for block, warps in ((4096, 8), (2048, 4), (1024, 4), (2048, 8), (8192, 8), (8192, 16), (4096, 4), (1024, 2)):
        module.BLOCK, module.NUM_WARPS = block, warps
        optimizer = module.MasterAdamW([{"params": masters.masters, "weight_decay": 0.0}], masters, **probe.ADAM)
        for w in weights:
            w.grad = torch.randn_like(w) * 1e-3
        ms = timed(optimizer.step)
        print(f"{name} BLOCK {block} warps {warps}: {ms:.2f} ms, {28 * n / ms / 1e9:.2f} TB/s", flush=True)
        del optimizer
