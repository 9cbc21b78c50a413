"""ImageFolder (ImageNet layout) that skips unreadable images instead of failing the run."""
from pathlib import Path

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from zoo.data.images import load_pil_rgb

__all__ = ['SafeImageFolder', 'UNREADABLE']

# Marker item for an image that could not be decoded; `skip_unreadable_collate` drops and counts it.
UNREADABLE = None


class SafeImageFolder(ImageFolder):
    """`root/<class>/<image>` folders; a corrupt or unreadable file yields UNREADABLE instead of raising.

    Raises:
        FileNotFoundError: the root is missing or holds no class folder with images.
    """

    def __init__(self, root: str, transform=None, target_transform=None):
        path = Path(root)
        if not path.is_dir():
            raise FileNotFoundError(f'dataset folder not found: {root}')
        classes = [d for d in path.iterdir() if d.is_dir()]
        if not any(f.suffix.lower() in IMG_EXTENSIONS for d in classes for f in d.iterdir()):
            raise FileNotFoundError(f'no images in {root}: expected {root}/<class name>/<image file> '
                                    f'({", ".join(IMG_EXTENSIONS)})')
        super().__init__(root, transform=transform, target_transform=target_transform, allow_empty=True)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = load_pil_rgb(path)  # 16-bit samples keep their top 8 bits, transparency goes onto white
        except ValueError:
            return UNREADABLE
        if self.target_transform is not None:
            target = self.target_transform(target)
        return (self.transform(image) if self.transform else image), target
