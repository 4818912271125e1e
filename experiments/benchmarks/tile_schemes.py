"""Tile schemes of the sparse benchmarks: '4' or '8-8-4-4' -> gating blocks."""


def stage_tiles(scheme: str) -> tuple[int, ...]:
  """Tile size per stage of a `--tiles` scheme ('4' or '8-8-4-4')."""
  sizes = tuple(int(t) for t in scheme.split('-'))
  if len(sizes) not in (1, 4) or min(sizes) < 1:
    raise ValueError(f'A --tiles scheme is one tile size or four (one per '
                     f'stage) joined by "-", got {scheme!r}.')
  return sizes * 4 if len(sizes) == 1 else sizes


def gating_config_of(scheme: str) -> dict:
  """The CDG `gating` config of a tile scheme (all channels per tile)."""
  sizes = stage_tiles(scheme)
  blocks = tuple((t, t, 0) for t in sizes)
  return {'kind': 'cdg', 'block': blocks[0],
          'stage_blocks': () if len(set(sizes)) == 1 else blocks}
