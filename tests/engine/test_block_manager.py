from tuili.engine.block_manager import BlockManager
from tuili.engine.sequence import Request
from tuili.sampling_params import SamplingParams


def test_allocate_append_free():
    bm = BlockManager(num_blocks=4, block_size=16)
    seq = Request("r", None, list(range(20)), SamplingParams()).seqs[0]
    assert bm.can_allocate(seq, 20)
    bm.allocate(seq, 20)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    bm.allocate(seq, 32)  # still fits in two blocks
    assert len(seq.block_table) == 2
    bm.allocate(seq, 33)  # appending token 33 needs a third
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert not bm.can_allocate(seq, 65)
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 4 and bm.peak_used == 3
