"""experiments/benchmarks/profile_step.py: its reading of a compiled program
and of a trace, on hand-written inputs (no compilation), and its record."""

import os

import pytest

from experiments.benchmarks import profile_step
from experiments.common import records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HLO = '''HloModule jit_train_step

%fused_computation.1 (param_0: f32[2,8,8,4], param_1: f32[3,3,4,6]) -> f32[2,8,8,6] {
  %param_0 = f32[2,8,8,4]{3,2,1,0} parameter(0)
  %param_1 = f32[3,3,4,6]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = f32[2,8,8,6]{3,2,1,0} convolution(%param_0, %param_1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(train_step)/jvp(SSLNetwork)/backbone/stage1_block0/conv1/conv1._plain/conv_general_dilated"}
}

%fused_computation.2 (param_0.2: f32[2,8,8,4]) -> f32[4,8,8,2] {
  %param_0.2 = f32[2,8,8,4]{3,2,1,0} parameter(0)
  %mul.5 = f32[2,8,8,4]{3,2,1,0} multiply(%param_0.2, %param_0.2), metadata={op_name="jit(train_step)/jvp(SSLNetwork)/backbone/stem_conv/stem_conv._plain/stem_bn/mul"}
  %transpose.7 = f32[4,8,8,2]{0,2,1,3} transpose(%mul.5), dimensions={3,1,2,0}
  ROOT %copy.7 = f32[4,8,8,2]{3,2,1,0} copy(%transpose.7)
}

ENTRY %main (x: f32[2,8,8,4], k: f32[3,3,4,6], a: f32[16,32], b: f32[32,5], dy: f32[8,8,2,6]) -> f32[2,8,8,6] {
  %x = f32[2,8,8,4]{3,2,1,0} parameter(0)
  %k = f32[3,3,4,6]{3,2,1,0} parameter(1)
  %a = f32[16,32]{1,0} parameter(2)
  %b = f32[32,5]{1,0} parameter(3)
  %dy = f32[8,8,2,6]{3,2,1,0} parameter(4)
  %transpose_copy_fusion.1 = f32[4,8,8,2]{3,2,1,0} fusion(%x), kind=kLoop, calls=%fused_computation.2
  %convolution.9 = f32[4,3,3,6]{3,2,1,0} convolution(%transpose_copy_fusion.1, %dy), window={size=8x8 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(train_step)/transpose(jvp(SSLNetwork))/backbone/stage1_block0/conv1/conv1._plain/conv_general_dilated"}
  %conv_fusion = f32[2,8,8,6]{3,2,1,0} fusion(%x, %k), kind=kCustom, calls=%fused_computation.1
  %dot.3 = f32[16,5]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/transpose(jvp(SSLNetwork))/projector/dense0/dot_general"}
  %copy.2 = f32[16,5]{0,1} copy(%dot.3)
  %bn = f32[2,8,8,6]{3,2,1,0} multiply(%conv_fusion, %conv_fusion), metadata={op_name="jit(train_step)/jvp(SSLNetwork)/backbone/stage1_block0/conv1/conv1._plain/bn1/mul"}
  ROOT %aug = f32[2,8,8,6]{3,2,1,0} add(%bn, %bn), metadata={op_name="jit(train_step)/augment/add"}
}
'''


def test_parse_hlo_counts_macs_geometry_and_sources():
  ops = profile_step.parse_hlo(_HLO)
  assert 'convolution.1' not in ops   # counted with its fusion
  conv = ops['conv_fusion']
  assert conv.macs == 2 * 8 * 8 * 6 * 3 * 3 * 4
  assert conv.has_convolution
  assert conv.conv_geometry == {'batch': 2, 'height': 8, 'width': 8,
                                'channels_in': 4, 'channels_out': 6,
                                'kernel': 3, 'stride': 1}
  assert ops['dot.3'].macs == 16 * 5 * 32
  assert profile_step.classify(conv) == ('convolution', 'forward')
  assert profile_step.conv_layer(conv) == 'backbone/stage1_block0/conv1'
  assert profile_step.classify(ops['dot.3']) == ('projector/predictor',
                                                 'backward')
  assert profile_step.classify(ops['bn']) == ('batchnorm', 'forward')
  assert profile_step.classify(ops['aug']) == ('augmentation', 'forward')
  # No source of its own: it takes its operand's, a backward op's.
  assert ops['copy.2'].inherited
  assert profile_step.classify(ops['copy.2']) == ('projector/predictor',
                                                  'backward')
  assert ops['copy.2'].lays_out_for is None   # read by no convolution
  # The batch-minor input of a weight-gradient convolution, with a
  # BatchNorm recomputed inside: by its sources a forward BatchNorm op, by
  # what reads it a layout of the convolution's operand, in its pass.
  layout = ops['transpose_copy_fusion.1']
  assert layout.lays_out_for == 'convolution.9'
  assert profile_step.classify(layout) == ('batchnorm', 'forward')
  assert profile_step.classify(layout, ops) == (
      'convolution operand layouts', 'backward')
  assert ops['bn'].lays_out_for is None


def test_wall_shares_split_overlapping_ops_equally():
  executed = [{'op': 'a', 'device': 0, 'start': 0.0, 'end': 4.0},
              {'op': 'b', 'device': 1, 'start': 2.0, 'end': 6.0},
              {'op': 'a', 'device': 1, 'start': 8.0, 'end': 9.0}]
  shares = profile_step.wall_shares(executed)
  assert shares['a'] == pytest.approx(2.0 + 1.0 + 1.0)
  assert shares['b'] == pytest.approx(1.0 + 2.0)
  assert sum(shares.values()) == pytest.approx(7.0)   # time any op ran


_COND_HLO = '''HloModule jit_train_step

%branch_0 (p0: f32[4,8]) -> f32[4,8] {
  ROOT %p0 = f32[4,8]{1,0} parameter(0)
}

%branch_1 (p1: f32[4,8]) -> f32[4,8] {
  %p1 = f32[4,8]{1,0} parameter(0)
  %w1 = f32[8,8]{1,0} constant({...})
  ROOT %dot.5 = f32[4,8]{1,0} dot(%p1, %w1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/jvp(SSLNetwork)/backbone/stage1_block0/conv1/conv1._cdg_in_mode/conv1._cdg/shard_map/cond/branch_1_fun/dot_general"}
}

ENTRY %main (i: s32[], x: f32[4,8]) -> f32[4,8] {
  %i = s32[] parameter(0)
  %x = f32[4,8]{1,0} parameter(1)
  ROOT %conditional.1 = f32[4,8]{1,0} conditional(%i, %x, %x), branch_computations={%branch_0, %branch_1}, metadata={op_name="jit(train_step)/jvp(SSLNetwork)/backbone/stage1_block0/conv1/conv1._cdg_in_mode/conv1._cdg/shard_map/cond"}
}
'''


def test_a_conditional_knows_its_branch_ops_and_tile_products_are_convolutions():
  ops = profile_step.parse_hlo(_COND_HLO)
  assert ops['conditional.1'].contains == {'p0', 'p1', 'w1', 'dot.5'}
  assert not ops['dot.5'].contains
  # The executor's matrix products over the open tiles' patches belong to
  # the convolution layer whose capacity branch runs them.
  assert profile_step.classify(ops['dot.5']) == ('convolution', 'forward')
  assert profile_step.conv_layer(ops['dot.5']) == 'backbone/stage1_block0/conv1'
  assert profile_step.classify(ops['conditional.1'])[0] == 'gating'
  # A strided layer's 'patches' formulation: a matrix product of the layer.
  patches = profile_step.Op('ynn_fusion.3', 'fusion', (
      'jit(train_step)/jvp(SSLNetwork)/backbone/stage2_block0/conv1/'
      'conv1._cdg_in_mode/conv1._cdg/dot_general',), macs=64)
  assert profile_step.classify(patches) == ('convolution', 'forward')
  assert profile_step.conv_layer(patches) == 'backbone/stage2_block0/conv1'
  projector = profile_step.Op('dot.9', 'dot', (
      'jit(train_step)/jvp(SSLNetwork)/projector/dense0/dot_general',), macs=64)
  assert profile_step.classify(projector)[0] == 'projector/predictor'


def test_a_conditional_gets_only_the_time_its_branch_ops_leave():
  executed = [{'op': 'conditional.1', 'device': 0, 'start': 0.0, 'end': 10.0},
              {'op': 'dot.5', 'device': 0, 'start': 2.0, 'end': 6.0},
              # The same op on the other device is not this one's branch.
              {'op': 'dot.5', 'device': 1, 'start': 7.0, 'end': 8.0}]
  shares = profile_step.wall_shares(executed,
                                    {'conditional.1': frozenset({'dot.5'})})
  # 0-2 and 6-10 its own (shared with device 1's dot over 7-8), 2-6 the dot's.
  assert shares['conditional.1'] == pytest.approx(2.0 + 3.0 + 0.5)
  assert shares['dot.5'] == pytest.approx(4.0 + 0.5)
  assert sum(shares.values()) == pytest.approx(10.0)
  # Without the branch map both run at once and split 2-6 equally.
  assert profile_step.wall_shares(executed)['dot.5'] == pytest.approx(2.5)


def test_the_layer_of_an_op_is_the_convolution_module():
  def op(name):
    return profile_step.Op('c', 'convolution', (name,), 1, None, True)
  stem = 'jit(train_step)/jvp(SSLNetwork)/backbone/'
  assert profile_step.conv_layer(op(
      stem + 'stage1_block0/conv2/conv2._plain/bn2/conv_general_dilated')
  ) == 'backbone/stage1_block0/conv2'
  assert profile_step.conv_layer(op(
      stem + 'stage2_block0/stage2_block0.shortcut/shortcut_conv/'
      'shortcut_conv._plain/conv_general_dilated')
  ) == 'backbone/stage2_block0/shortcut_conv'
  assert profile_step.conv_layer(op(
      stem + 'stage1_block0/conv1/conv1._cdg_in_mode/conv1._cdg/shard_map/'
      'conv_general_dilated')) == 'backbone/stage1_block0/conv1'


def test_the_profile_is_written_as_a_new_record(tmp_path):
  step = {'description': 'hand-made step', 'step_s': 0.5, 'devices': 2,
          'busy_s': 0.4, 'outside_ops_s': 0.1, 'first_step_s': 3.0,
          'categories': {'convolution|forward': 0.3,
                         'convolution|backward': 0.1},
          'top_ops': [{'op': 'conv_fusion', 'opcode': 'fusion',
                       'category': 'convolution', 'pass': 'forward',
                       'seconds': 0.3, 'source': 'jit(train_step)/conv'}],
          'layers': {}, 'shapes': []}
  result = {'flags': {'step_kinds': ['protocol']}, 'repeats': 2,
            'steps': {'protocol': step}}
  devices = {'platform': 'cpu', 'count': 2, 'processes': 1, 'kind': 'cpu'}
  first = profile_step.write_report(result, str(tmp_path), devices)
  second = profile_step.write_report(result, str(tmp_path), devices)
  assert records.records_in(str(tmp_path)) == [first, second]
  record = records.read_record(first)
  assert record['record']['kind'] == 'profile'
  assert record['record']['devices'] == devices
  assert {k: v for k, v in record.items() if k != 'record'} == result
  markdown = open(records.markdown_path(first)).read()
  assert '## protocol: hand-made step' in markdown
  assert '| convolution | 300.0 | 100.0 | 400.0 | 100.0% |' in markdown
  assert '- machine: ' in markdown and '- command: `python ' in markdown
