"""Does trainer.channels_last pay on CPU? Contiguous (NCHW) vs channels-last memory format, same model and input.

For each model at its default input size, batch --batch: eval forward (no_grad) and a training step (forward +
backward of the mean logit, train mode). The two formats alternate A B A B within one process (after one warm-up
of each), the figure is the minimum over --repeats, and the ratio is contiguous time / channels-last time (> 1:
channels-last is faster). Channels-last is applied as the engine does: model.to(memory_format=channels_last) and
the input made channels-last.

    PYTHONPATH=. .venv/bin/python benchmarks/channels_last_cpu.py --models overlock_xt halonet_paper_h0
"""
import argparse
import time

import timm
import torch

import zoo  # noqa: F401  (registers the zoo models)

FORMATS = {'contiguous': torch.contiguous_format, 'channels_last': torch.channels_last}


def _step(model: torch.nn.Module, images: torch.Tensor, mode: str) -> None:
    if mode == 'eval':
        with torch.no_grad():
            model.eval()(images)
        return
    model.train()
    model.zero_grad(set_to_none=True)
    model(images).mean().backward()


def _time(model, images, mode: str) -> float:
    start = time.perf_counter()
    _step(model, images, mode)
    return time.perf_counter() - start


def compare(name: str, batch: int, repeats: int) -> None:
    torch.manual_seed(0)
    models, inputs = {}, {}
    for fmt, memory_format in FORMATS.items():
        model = timm.create_model(name)
        size = model.pretrained_cfg['input_size'][-1]
        models[fmt] = model.to(memory_format=memory_format)
        inputs[fmt] = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
    for fmt in FORMATS:
        models[fmt].load_state_dict(models['contiguous'].state_dict())
    for mode in ('eval', 'train_step'):
        times = {fmt: [] for fmt in FORMATS}
        for fmt in FORMATS:
            _step(models[fmt], inputs[fmt], mode)  # warm-up
        for _ in range(repeats):
            for fmt in FORMATS:
                times[fmt].append(_time(models[fmt], inputs[fmt], mode))
        best = {fmt: min(values) for fmt, values in times.items()}
        print(f'| {name} | {size} | {batch} | {mode} | {batch / best["contiguous"]:.2f} | '
              f'{batch / best["channels_last"]:.2f} | {best["contiguous"] / best["channels_last"]:.2f} |', flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=['overlock_xt', 'halonet_paper_h0'])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print('| model | size | batch | mode | contiguous img/s | channels_last img/s | contiguous / channels_last time |')
    print('|---|---|---|---|---|---|---|')
    for name in args.models:
        compare(name, args.batch, args.repeats)


if __name__ == '__main__':
    main()
