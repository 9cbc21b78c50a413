"""Fuzzing (heavy, run with `pytest -m heavy tests/test_fuzz.py`): thousands of random corruptions of bitstreams,
checkpoints and recipes. Each must load, or fail with the documented error type; none may crash the process,
raise anything else, or take more than a few seconds.

Every target runs in a subprocess (this file run as a script), so a crash inside a native library (the range
coder, safetensors, the YAML parser) fails the test instead of killing pytest; the counts it prints are recorded in
benchmarks/RESULTS.md ("Fuzzing")."""
import json
import random
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Tuple

import pytest

CASES = 1000
SECONDS_PER_CASE = 5.0
TARGETS = ('bitstream', 'bitstream_checksummed', 'codec_file', 'weights_file', 'training_checkpoint', 'model_config',
           'recipe_text', 'recipe_tree')


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """One random corruption: bit flips, overwritten or deleted or inserted bytes, truncation, or a spliced copy."""
    data = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        start = rng.randrange(len(data))
        data[start:start + rng.randint(1, 16)] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 2:
        start = rng.randrange(len(data))
        del data[start:start + rng.randint(1, 64)]
    elif kind == 3:
        start = rng.randrange(len(data) + 1)
        data[start:start] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == 4:
        del data[rng.randrange(len(data)):]
    else:
        start, destination = rng.randrange(len(data)), rng.randrange(len(data))
        chunk = data[start:start + rng.randint(1, 256)]
        data[destination:destination + len(chunk)] = chunk
    return bytes(data)


def _tiny_codec(seed: int = 0):
    import torch
    from zoo.codecs import create_codec
    torch.manual_seed(seed)
    return create_codec('compressai:bmshj2018-hyperprior', 3, N=8, M=12).eval()


def _image():
    import torch
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8, generator=g)


def _bitstream_target(checksummed: bool) -> Tuple[Callable[[random.Random], bytes], Callable[[bytes], None], tuple]:
    from zoo.codecs import BitstreamError, compress_image, decompress_image
    codec = _tiny_codec()
    stream = compress_image(codec, _image(), 'fuzz', 3)

    def make(rng):
        corrupted = _mutate(stream, rng)
        if checksummed and len(corrupted) > 4:  # a valid checksum: the header checks and the decoder must cope
            body = corrupted[:-4]
            corrupted = body + struct.pack('<I', zlib.crc32(body))
        return corrupted

    return make, lambda data: decompress_image(codec, data, 'fuzz'), (BitstreamError,)


def _file_target(folder: Path, name: str, content: bytes, load: Callable[[Path], object], errors: tuple):
    path = folder / name

    def run(data: bytes) -> None:
        path.write_bytes(data)
        load(path)

    return (lambda rng: _mutate(content, rng)), run, errors


def _codec_file_target(folder: Path):
    from zoo.codecs import load_codec, save_codec
    source = save_codec(_tiny_codec(), folder / 'source.safetensors', 'compressai:bmshj2018-hyperprior', 3,
                        {'kwargs': {'N': 8, 'M': 12}})
    return _file_target(folder, 'codec.safetensors', source.read_bytes(), load_codec, (ValueError,))


def _weights_file_target(folder: Path):
    import timm
    import torch
    from zoo.models import read_state_dict
    model = timm.create_model('nat_mini', embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], num_classes=3)
    torch.save({'model': model.state_dict(), 'epoch': 3}, folder / 'source.pth')

    def load(path):
        state = read_state_dict(path)
        model.load_state_dict(state)

    return _file_target(folder, 'weights.pth', (folder / 'source.pth').read_bytes(), load, (ValueError, RuntimeError))


def _training_checkpoint_target(folder: Path):
    import torch
    from zoo.tasks.engine import resume_checkpoint
    checkpoints = folder / 'run' / 'checkpoints'
    checkpoints.mkdir(parents=True)
    content = {'state_dict': {'model.weight': torch.randn(4, 4)}, 'epoch': 1, 'global_step': 10,
               'optimizer_states': [{'state': {}, 'param_groups': [{'lr': 0.1}]}]}
    torch.save(content, folder / 'source.ckpt')
    return _file_target(folder, 'run/checkpoints/last.ckpt', (folder / 'source.ckpt').read_bytes(),
                        lambda path: resume_checkpoint('last', folder / 'run'), (ValueError, FileNotFoundError))


def _model_config_target(folder: Path):
    import timm
    from zoo.tasks.classification import load_model
    model = timm.create_model('nat_mini', embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], num_classes=3)
    timm.models.save_for_hf(model, str(folder / 'model'), safe_serialization=True,
                            model_config={'model_args': {'embed_dim': 8, 'depths': [1, 1, 1, 1],
                                                         'num_heads': [1, 1, 1, 1]}})
    content = (folder / 'model' / 'config.json').read_bytes()

    def run(data: bytes) -> None:
        (folder / 'model' / 'config.json').write_bytes(data)
        load_model(str(folder / 'model'), None)

    return (lambda rng: _mutate(content, rng)), run, (ValueError, FileNotFoundError)


RECIPE = Path(__file__).resolve().parents[1] / 'recipes' / 'classification' / 'quickstart.yaml'


def _recipe_text_target(folder: Path):
    from zoo.recipes import RecipeError
    from zoo.tasks import load_recipe
    return _file_target(folder, 'recipe.yaml', RECIPE.read_bytes(), load_recipe, (RecipeError,))


def _recipe_tree_target(folder: Path):
    """Structural corruptions: a random key renamed, removed, or given a value of another type."""
    import yaml
    from zoo.recipes import RecipeError
    from zoo.tasks import load_recipe
    tree = yaml.safe_load(RECIPE.read_text())
    values = [None, 0, -1, 1.5, 'text', [], [1, 'a'], {}, {'x': 1}, True, 10 ** 12]

    def make(rng):
        mutated = json.loads(json.dumps(tree))
        node = mutated
        while isinstance(node, dict) and node and rng.random() < 0.7:
            key = rng.choice(sorted(node))
            if not isinstance(node[key], dict):
                break
            node = node[key]
        key = rng.choice(sorted(node))
        action = rng.randrange(3)
        if action == 0:
            node[key + rng.choice(['s', '_', 'x'])] = node.pop(key)
        elif action == 1:
            del node[key]
        else:
            node[key] = rng.choice(values)
        return yaml.safe_dump(mutated).encode()

    path = folder / 'tree.yaml'

    def run(data: bytes) -> None:
        path.write_bytes(data)
        load_recipe(path)

    return make, run, (RecipeError,)


def fuzz(target: str, cases: int, seed: int, folder: Path) -> Dict:
    """Run `cases` corruptions of `target`: counts of what happened and the slowest case."""
    builders = {
        'bitstream': lambda: _bitstream_target(False), 'bitstream_checksummed': lambda: _bitstream_target(True),
        'codec_file': lambda: _codec_file_target(folder), 'weights_file': lambda: _weights_file_target(folder),
        'training_checkpoint': lambda: _training_checkpoint_target(folder),
        'model_config': lambda: _model_config_target(folder), 'recipe_text': lambda: _recipe_text_target(folder),
        'recipe_tree': lambda: _recipe_tree_target(folder),
    }
    make, run, expected = builders[target]()
    rng = random.Random(seed)
    outcomes, unexpected, slowest = Counter(), [], 0.0
    for case in range(cases):
        data = make(rng)
        start = time.perf_counter()
        try:
            run(data)
            outcomes['loaded'] += 1
        except expected as err:
            outcomes[type(err).__name__] += 1
        except Exception as err:  # anything else is a finding: report it with the case that produced it
            outcomes['unexpected'] += 1
            unexpected.append(f'case {case}: {type(err).__name__}: {str(err)[:300]}')
        slowest = max(slowest, time.perf_counter() - start)
    return {'target': target, 'cases': cases, 'outcomes': dict(outcomes), 'unexpected': unexpected[:10],
            'slowest_s': round(slowest, 3)}


@pytest.mark.heavy
@pytest.mark.parametrize('target', TARGETS)
def test_random_corruptions_load_or_fail_with_the_documented_error(target, tmp_path):
    result = subprocess.run([sys.executable, __file__, target, str(CASES), '0', str(tmp_path)], capture_output=True,
                            text=True, timeout=CASES * SECONDS_PER_CASE)
    assert result.returncode == 0, f'the fuzzing process died (return code {result.returncode}): {result.stderr}'
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(report))
    assert report['cases'] == CASES and sum(report['outcomes'].values()) == CASES
    assert not report['unexpected'], report['unexpected']
    assert report['slowest_s'] < SECONDS_PER_CASE


if __name__ == '__main__':
    import warnings
    warnings.simplefilter('ignore')
    print(json.dumps(fuzz(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))))
