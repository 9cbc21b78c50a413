"""CPU throughput and peak memory of zoo models (OverLoCK by default) against timm's convnext_tiny, in the same run.

For each (model, form, image size): forward only at batch 1 (no_grad, eval) and, at sizes <= --train-max-size,
one training step (forward + backward, train mode; OverLoCK through forward_with_aux with the official
main + 0.4 * aux loss). Forms: 'train' (as trained: DilatedReparamBlocks unfolded) and 'reparam'
(`model.reparam()`, the deploy form); convnext_tiny has one form.

Each measurement runs in a fresh subprocess, so its peak resident memory (ru_maxrss) belongs to it alone;
the figure reported is that peak minus the resident memory just before the measured pass (model and input
already built), i.e. what the pass itself adds. Times are medians of --repeats passes after one warm-up, by
wall clock or, with --clock cpu, by the process's CPU time (on a shared machine that leaves out the time other
processes hold the cores; it measures the work itself with --threads 1, since with more threads it also counts
OpenMP threads spinning). Ratios are against convnext_tiny at the same size and mode.

    PYTHONPATH=. .venv/bin/python benchmarks/overlock_cpu.py --sizes 224 512 1024 --json /tmp/overlock_cpu.json

Any hierarchical model takes the 'train' form (`--forms train`), e.g. the peak-memory check at 1024 x 1024:

    PYTHONPATH=. .venv/bin/python benchmarks/overlock_cpu.py --models nat_mini transnext_micro halonet_paper_h0 \
        --sizes 1024 --train-max-size 0 --forms train --repeats 1
"""
import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List

BASELINE = 'convnext_tiny'
CLOCKS = {'wall': time.perf_counter, 'cpu': time.process_time}


def _rss_mib() -> float:
    """Current resident memory of this process in MiB (Linux)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def _measure(model_name: str, form: str, size: int, mode: str, repeats: int, threads: int, clock: str) -> Dict:
    """Runs in the child process: one configuration, returns seconds per image and peak MiB added by the pass."""
    import timm
    import torch

    import zoo  # noqa: F401  (registers the models)

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(model_name)
    if form == 'reparam':
        model.eval().reparam()
    if mode != 'forward' and hasattr(model, 'set_aux_head_trainable'):
        model.set_aux_head_trainable(True)  # the official training step trains the auxiliary head too
    x = torch.randn(1, 3, size, size)

    def step():
        if mode == 'forward':
            with torch.no_grad():
                model.eval()(x)
            return
        model.train()
        if hasattr(model, 'forward_with_aux'):
            logits, aux = model.forward_with_aux(x)
            loss = logits.logsumexp(-1).sum() + 0.4 * aux.logsumexp(-1).sum()
        else:
            loss = model(x).logsumexp(-1).sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    before = _rss_mib()
    step()  # warm-up; its peak is the pass's peak too
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    now = CLOCKS[clock]
    times = []
    for _ in range(repeats):
        start = now()
        step()
        times.append(now() - start)
    return dict(seconds=statistics.median(times), peak_mib=max(0.0, peak - before))


def _run_child(args, model_name: str, form: str, size: int, mode: str) -> Dict:
    cmd = [sys.executable, __file__, '--child', model_name, form, str(size), mode, '--repeats', str(args.repeats),
           '--threads', str(args.threads), '--clock', args.clock]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode != 0:
        return dict(error=out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f'exit {out.returncode}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=['overlock_xt', 'overlock_t'])
    parser.add_argument('--sizes', nargs='+', type=int, default=[224, 512, 1024])
    parser.add_argument('--train-max-size', type=int, default=512)
    parser.add_argument('--forms', nargs='+', choices=('train', 'reparam'), default=['train', 'reparam'],
                        help="'reparam' needs a model with reparam() (OverLoCK)")
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--clock', choices=sorted(CLOCKS), default='wall')
    parser.add_argument('--timeout', type=float, default=1800)
    parser.add_argument('--json', default=None)
    parser.add_argument('--child', nargs=4, metavar=('MODEL', 'FORM', 'SIZE', 'MODE'), default=None)
    args = parser.parse_args(argv)
    if args.child:
        name, form, size, mode = args.child
        print(json.dumps(_measure(name, form, int(size), mode, args.repeats, args.threads, args.clock)))
        return

    rows = []
    for size in args.sizes:
        for mode in ('forward', 'train_step'):
            if mode == 'train_step' and size > args.train_max_size:
                continue
            base = _run_child(args, BASELINE, 'train', size, mode)
            rows.append(dict(model=BASELINE, form='-', size=size, mode=mode, **base))
            for name in args.models:
                for form in args.forms:
                    if mode == 'train_step' and form == 'reparam':
                        continue  # the deploy form is for inference
                    res = _run_child(args, name, form, size, mode)
                    row = dict(model=name, form=form, size=size, mode=mode, **res)
                    if 'error' not in res and 'error' not in base:
                        row['time_ratio'] = res['seconds'] / base['seconds']
                        row['mem_ratio'] = res['peak_mib'] / base['peak_mib'] if base['peak_mib'] else None
                    rows.append(row)
                    print(_format(row), flush=True)

    print(f'\n{"model":<24}{"form":<9}{"size":>6} {"mode":<11}{"img/s":>9}{"peak MiB":>10}'
          f'{"time x cnx_t":>14}{"mem x cnx_t":>13}')
    for row in rows:
        print(_format(row))
    if args.json:
        meta = dict(date=datetime.date.today().isoformat(), machine=platform.machine(), threads=args.threads,
                    clock=args.clock,
                    torch=__import__('torch').__version__, command=' '.join(sys.argv))
        with open(args.json, 'w') as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


def _format(row: Dict) -> str:
    if 'error' in row:
        return f'{row["model"]:<24}{row["form"]:<9}{row["size"]:>6} {row["mode"]:<11} error: {row["error"]}'
    ratio = f'{row["time_ratio"]:.2f}' if 'time_ratio' in row else '1'
    mem = f'{row["mem_ratio"]:.2f}' if row.get('mem_ratio') is not None else ('1' if row['form'] == '-' else '-')
    return (f'{row["model"]:<24}{row["form"]:<9}{row["size"]:>6} {row["mode"]:<11}{1 / row["seconds"]:>9.2f}'
            f'{row["peak_mib"]:>10.0f}{ratio:>14}{mem:>13}')


if __name__ == '__main__':
    main()
