"""The convolutions of the CIFAR ResNet-18 the benchmarks time, shape by
shape (`benchmark_conv_forms.py`, `benchmark_weight_gradient.py`)."""

# network -> (width, image size, batch of views)
NETWORKS = {'wide': (64, 32, 256), 'protocol': (16, 16, 512)}


def resnet18_shapes(width: int, size: int, batch: int) -> list[dict]:
  """The distinct convolutions of a CIFAR ResNet-18 (3x3 stem, no pool),
  with how many layers share each."""
  shapes = [dict(batch=batch, size=size, channels_in=3, channels_out=width,
                 kernel=3, stride=1, layers=1)]
  channels = width
  for stage in range(4):
    out = width * 2 ** stage
    stride = 1 if stage == 0 else 2
    if stride == 2:
      shapes.append(dict(batch=batch, size=size, channels_in=channels,
                         channels_out=out, kernel=3, stride=2, layers=1))
      shapes.append(dict(batch=batch, size=size, channels_in=channels,
                         channels_out=out, kernel=1, stride=2, layers=1))
      size //= 2
    shapes.append(dict(batch=batch, size=size, channels_in=out,
                       channels_out=out, kernel=3, stride=1,
                       layers=4 if stride == 1 else 3))
    channels = out
  return shapes
