#include "emu.hpp"
#include "../../kernels/dist.cu"
THOR_EMU_REGISTER(dist_pack_f32)
THOR_EMU_REGISTER(dist_unpack_f32)
THOR_EMU_REGISTER(dist_meta_f32)
THOR_EMU_REGISTER(dist_resolve_f32)
THOR_EMU_REGISTER(dist_ema_f32)
THOR_EMU_REGISTER(dist_own_mask_f32)
