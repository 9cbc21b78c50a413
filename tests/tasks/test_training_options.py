"""Recipe options that make a run train what the papers trained: repeated augmentation, the torchvision RandAugment
policy, squash eval, sliding-window segmentation, a static fp16 loss scale, the name-substring weight-decay rule and
the hand-over of weights and EMA between phases. Small and model-free where possible."""
import pytest
import torch
import torch.nn as nn
from PIL import Image
from timm.data.distributed_sampler import RepeatAugSampler as TimmRepeatAugSampler
from timm.utils import ModelEmaV3

from zoo.data.samplers import RepeatAugSampler
from zoo.data.transforms import randaugment_square_transform
from zoo.recipes import Recipe, RecipeError, recipe_from_dict
from zoo.tasks import phases
from zoo.tasks.engine import Monitor, StaticGradScaler, TaskModule, build_trainer, name_rule_groups
from zoo.tasks.segmentation import slide_logits


@pytest.mark.parametrize('size, replicas', [(1000, 1), (1000, 4), (100, 3)])
def test_repeat_sampler_draws_timms_indices_at_seed_zero(size, replicas):
    data = list(range(size))
    for rank in range(replicas):
        ours = RepeatAugSampler(data, 3, num_replicas=replicas, rank=rank, seed=0)
        reference = TimmRepeatAugSampler(data, num_replicas=replicas, rank=rank, num_repeats=3)
        for epoch in (0, 2):
            ours.set_epoch(epoch)
            reference.set_epoch(epoch)
            assert list(ours) == list(reference)
        assert len(ours) == len(reference)


def test_repeat_sampler_resumes_mid_epoch_with_the_next_index():
    data = list(range(600))
    sampler = RepeatAugSampler(data, 3, seed=7)
    sampler.set_epoch(4)
    iterator = iter(sampler)
    seen = [next(iterator) for _ in range(100)]
    resumed = RepeatAugSampler(data, 3, seed=7)
    resumed.set_epoch(4)
    resumed.load_state_dict(sampler.state_dict())
    full = RepeatAugSampler(data, 3, seed=7)
    full.set_epoch(4)
    assert seen + list(resumed) == list(full)
    assert full.state_dict() == {'yielded': 512}  # 600 // 256 * 256 on one process


def test_repeat_sampler_refuses_a_non_positive_count():
    with pytest.raises(ValueError, match='aug_repeats'):
        RepeatAugSampler(list(range(10)), 0)


def test_torchvision_policy_resizes_to_a_square_and_validates_its_options():
    transform = randaugment_square_transform(32, 2, 9, 'bilinear', (0.5,) * 3, (0.5,) * 3)
    image = Image.new('RGB', (80, 40), (200, 30, 30))
    assert transform(image).shape == (3, 32, 32)
    with pytest.raises(ValueError, match='train_interpolation'):
        randaugment_square_transform(32, 2, 9, 'random', (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match='magnitude'):
        randaugment_square_transform(32, 2, 31, 'bilinear', (0.5,) * 3, (0.5,) * 3)


def _recipe(**sections) -> Recipe:
    return recipe_from_dict({'model': {'name': 'nat_mini'}, **sections}, 'test')


@pytest.mark.parametrize('sections, message', [
    ({'aug': {'policy': 'torchvision_randaugment'}}, 'aug.hflip, aug.color_jitter'),
    ({'aug': {'policy': 'tv'}}, '`aug.policy` must be one of'),
    ({'data': {'crop_mode': 'squish'}}, '`data.crop_mode` must be one of'),
    ({'eval': {'mode': 'tiles'}}, '`eval.mode` must be one of'),
    ({'trainer': {'loss_scale': 512.0}}, 'needs trainer.precision=16-mixed'),
    ({'schedule': {'epoch_lag': 1, 'sched_on_updates': True}}, 'epoch_lag'),
    ({'data': {'aug_repeats': -1}}, 'data.aug_repeats'),
    ({'optim': {'no_decay_names': ['norm'], 'layer_decay': 0.7}}, 'cannot be combined'),
])
def test_recipe_options_refuse_inconsistent_settings(sections, message):
    with pytest.raises(RecipeError, match=message):
        _recipe(**sections)


def _pointwise(images: torch.Tensor) -> torch.Tensor:
    """A per-pixel 'model': its logits at a pixel depend on that pixel only, wherever the window lies."""
    return torch.cat([images.sum(1, keepdim=True), -images[:, :1]], dim=1)


def test_slide_windows_agree_with_the_whole_image_for_a_per_pixel_model():
    images = torch.randn(2, 3, 64, 96)
    for crop, stride in ((64, 32), (32, 21), (128, 85)):
        assert torch.allclose(slide_logits(_pointwise, images, 2, crop, stride), _pointwise(images), atol=1e-6)


def test_slide_window_covering_the_image_is_the_whole_image_pass():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(slide_logits(conv, images, 4, 64, 42), conv(images))


def test_slide_windows_average_what_each_window_predicts():
    """Width 7, window 4, stride 2: windows at columns [0, 4), [2, 6) and, moved back to the border, [3, 7). A model
    predicting its window's mean everywhere gives each column the mean over the windows covering it."""
    image = torch.arange(28, dtype=torch.float64).reshape(1, 1, 4, 7)

    def window_mean(crop):
        return crop.mean(dim=(2, 3), keepdim=True).expand_as(crop)

    a, b, c = (image[..., lo:hi].mean().item() for lo, hi in ((0, 4), (2, 6), (3, 7)))
    columns = [a, a, (a + b) / 2, (a + b + c) / 3, (b + c) / 2, (b + c) / 2, c]
    expected = torch.tensor(columns, dtype=torch.float64).expand(1, 1, 4, 7)
    assert torch.allclose(slide_logits(window_mean, image, 1, 4, 2), expected)


def test_segment_logits_slides_with_the_recipe_window_and_default_stride():
    from zoo.tasks.segmentation import segment_logits
    image = torch.randn(1, 1, 4, 7)
    whole = _recipe(task='segmentation', data={'img_size': 4})
    slide = _recipe(task='segmentation', data={'img_size': 4}, eval={'mode': 'slide'})

    def window_mean(crop):
        return crop.mean(dim=(2, 3), keepdim=True).expand_as(crop)

    assert torch.equal(segment_logits(window_mean, image, whole, 1), window_mean(image))
    assert torch.equal(segment_logits(window_mean, image, slide, 1), slide_logits(window_mean, image, 1, 4, 2))


def test_static_loss_scale_keeps_its_scale_through_overflow():
    weight = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = StaticGradScaler(512.0, device='cpu')
    for gradient in (torch.tensor([float('inf'), 1.0]), torch.tensor([1.0, 1.0])):
        optimizer.zero_grad()
        scaler.scale((weight * gradient).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        assert scaler.get_scale() == 512.0
    assert torch.allclose(weight.detach(), torch.tensor([0.9, 0.9]))  # the overflowing step was skipped


@pytest.mark.skipif(torch.cuda.is_available(), reason='the refusal is for machines without a CUDA GPU')
def test_static_loss_scale_refuses_a_cpu_run(tmp_path):
    recipe = _recipe(trainer={'precision': '16-mixed', 'loss_scale': 512.0})
    with pytest.raises(ValueError, match='needs a CUDA GPU'):
        build_trainer(recipe, tmp_path, Monitor('val_loss', 'min'))


def test_name_rule_exempts_matching_names_and_decays_biases():
    model = nn.Sequential()
    model.add_module('proj', nn.Linear(3, 3))
    model.add_module('norm', nn.LayerNorm(3))
    model.rpb = nn.Parameter(torch.zeros(3, 3))
    decayed, exempt = name_rule_groups(list(model.named_parameters()), ['norm', 'rpb'], 0.05)
    assert {id(p) for p in decayed['params']} == {id(model.proj.weight), id(model.proj.bias)}
    assert {id(p) for p in exempt['params']} == {id(model.norm.weight), id(model.norm.bias), id(model.rpb)}
    assert (decayed['weight_decay'], exempt['weight_decay']) == (0.05, 0.0)
    with pytest.raises(ValueError, match=r"\['cpb'\]"):
        name_rule_groups(list(model.named_parameters()), ['norm', 'cpb'], 0.05)


class _EmaModule(TaskModule):
    def __init__(self, recipe):
        super().__init__(recipe)
        self.model = nn.Linear(4, 2)
        self.ema = ModelEmaV3(self.model, decay=0.5)


class _EmaTask(_EmaModule):
    def parameter_groups(self):
        return self.model


def test_name_rule_regroups_only_what_the_task_trains():
    module = _EmaTask(_recipe(optim={'no_decay_names': ['bias'], 'weight_decay': 0.05}))
    decayed, exempt = module.create_main_optimizer().param_groups
    assert [p is module.model.weight for p in decayed['params']] == [True]
    assert [p is module.model.bias for p in exempt['params']] == [True]
    assert (decayed['weight_decay'], exempt['weight_decay']) == (0.05, 0.0)


def test_a_phase_starts_from_the_previous_raw_weights_and_ema(tmp_path):
    recipe = _recipe()
    first = _EmaModule(recipe)
    with torch.no_grad():
        first.model.weight.fill_(1.0)
    first.ema.update(first.model)  # EMA = (initial + ones) / 2: neither the raw weights nor the initial ones
    checkpoint = tmp_path / 'last.ckpt'
    torch.save({'state_dict': first.state_dict()}, checkpoint)
    second = _EmaModule(recipe)
    second.load_phase_state(str(checkpoint))
    assert torch.equal(second.model.weight, first.model.weight)
    assert torch.equal(second.ema.module.weight, first.ema.module.weight)
    assert not torch.equal(second.ema.module.weight, second.model.weight)


def test_train_phases_hands_each_phase_the_previous_last_checkpoint(tmp_path, monkeypatch):
    recipe = _recipe(phases=[{'schedule': {'epochs': 1}}, {'schedule': {'epochs': 2}}],
                     model={'name': 'nat_mini', 'checkpoint': '/weights/start.pth'})
    monkeypatch.setattr(phases, 'phase_recipes', lambda r: [recipe_from_dict({'model': {
        'name': 'nat_mini', 'checkpoint': '/weights/start.pth'}, 'schedule': p['schedule']}, 'phase')
        for p in r.phases])
    calls = []

    def train_fn(phase, output, start_from):
        calls.append((phase.schedule.epochs, phase.model.checkpoint, output, start_from))
        return {'val_top1': 1.0}

    phases.train_phases(recipe, str(tmp_path), train_fn)
    assert calls == [(1, '/weights/start.pth', str(tmp_path / 'phase1'), None),
                     (2, None, str(tmp_path / 'phase2'), str(tmp_path / 'phase1' / 'checkpoints' / 'last.ckpt'))]


class _ConvTask(TaskModule):
    def __init__(self, recipe):
        super().__init__(recipe)
        self.model = nn.Conv2d(3, 4, 3, padding=1)


def test_channels_last_converts_the_model_and_its_inputs_without_changing_outputs():
    images = torch.randn(2, 3, 8, 8)
    plain = _ConvTask(_recipe())
    expected = plain.model(images)
    module = _ConvTask(_recipe(trainer={'channels_last': True}))
    module.model.load_state_dict(plain.model.state_dict())
    module.prepare_model()
    assert module.model.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    module.model.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    assert torch.allclose(module.model(images), expected, atol=1e-6)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)


def test_compile_wraps_the_model_in_place_and_keeps_its_parameter_names():
    module = _ConvTask(_recipe(trainer={'compile': True}))
    names = list(module.state_dict())
    module.prepare_model()
    assert module.model._compiled_call_impl is not None and list(module.state_dict()) == names


def test_compile_needs_a_model_attribute():
    module = TaskModule(_recipe(trainer={'compile': True}))
    with pytest.raises(ValueError, match='`.model`'):
        module.prepare_model()


def test_kdgqa_recipes_train_and_evaluate_on_square_resizes():
    from torchvision import transforms as T

    from zoo.recipes import read_recipe_tree
    from zoo.tasks.classification import _transforms
    from zoo.tasks.engine import schedule_epochs
    recipe = recipe_from_dict(*read_recipe_tree('recipes/classification/kdgqa/vit_base_patch16_224_gqa_food101.yaml'))
    config = {'input_size': (3, 224, 224), 'interpolation': recipe.data.interpolation, 'mean': (0.5,) * 3,
              'std': (0.5,) * 3, 'crop_pct': recipe.data.crop_pct, 'crop_mode': recipe.data.crop_mode}
    train, val = _transforms(recipe, config)
    image = Image.fromarray(torch.randint(0, 256, (60, 90, 3), dtype=torch.uint8).numpy())
    reference = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BILINEAR), T.ToTensor(),
                           T.Normalize((0.5,) * 3, (0.5,) * 3)])
    assert torch.allclose(val(image), reference(image), atol=1e-6)
    assert isinstance(train.transforms[0], T.RandAugment) and train(image).shape == (3, 224, 224)
    assert (train.transforms[0].num_ops, train.transforms[0].magnitude) == (2, 9)
    assert schedule_epochs(recipe) == 5
