from .vgg import vgg

__all__ = ['vgg']
