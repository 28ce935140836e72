#include "emu.hpp"
#include "../../kernels/split.cu"
THOR_EMU_REGISTER(split_blocks_f32)
THOR_EMU_REGISTER(merge_blocks_f32)
