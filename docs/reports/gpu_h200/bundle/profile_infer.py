"""Where a one-rank DMP CiUBM inference forward spends its time, against the nn.Embedding
reference (mim bench train's two models), on the device given as argv[1]."""
import sys
from dataclasses import replace

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from train.bench_train import (TrainBenchConfig, VARIANTS, _process_group, bench_sizes, build_torchrec,
                               mm_vectors, reference_model, synthetic_batches, torchrec_weights)

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
ubm = sys.argv[2] if len(sys.argv) > 2 else "avg"
config = TrainBenchConfig(device=device, ubms=[ubm])
sizes = bench_sizes(config)
with _process_group(device) as ctx:
    batches = [b.to(ctx.device) for b in synthetic_batches(config)]
    for variant in ("Base", "Base+MIM"):
        model_config = replace(config.model, ubm=ubm, mm_dim=config.mm_dim, **VARIANTS[variant])
        model, _ = build_torchrec(config, model_config, sizes, ctx, mm_vectors(config, sizes))
        ref = reference_model(model_config, sizes, torchrec_weights(model), ctx.device)
        for name, m in (("torchrec", model), ("reference", ref)):
            m.eval()
            with torch.no_grad():
                for b in batches:
                    m(b)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
            with torch.no_grad(), profile(activities=acts) as prof:
                for i in range(20):
                    m(batches[i % len(batches)])
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize()
            events = prof.key_averages()
            syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
            d2h = sum(e.count for e in events if "Memcpy DtoH" in e.key)
            total_cpu = sum(e.self_cpu_time_total for e in events) / 20 / 1000
            # the table's "Self CUDA time total": kernels only (summing every row counts each twice)
            total_cuda = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA
                             and not e.is_user_annotation) / 20 / 1000
            print(f"\n=== {ubm} {variant} {name}: per forward self-CPU {total_cpu:.2f} ms, device {total_cuda:.2f} ms, "
                  f"syncs/forward {syncs / 20:.1f}, DtoH copies/forward {d2h / 20:.1f}")
            print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
