//! The primitive probes (kernels/probe.cu) on the GPU, against the same PTX-ISA expectations
//! as the emulator tests: where they pass here and there, the emulator's cp.async and
//! ldmatrix behave as the hardware's.

use super::*;
use common::probe_cases::*;

#[test]
fn gpu_cp_async_and_ldmatrix_probes_match_the_isa() {
    let Some(dev) = gpu_or_skip("gpu_cp_async_and_ldmatrix_probes_match_the_isa") else {
        return;
    };
    let s = dev.stream().clone();
    let input = cp_input();
    let din = s.clone_htod(&input).unwrap();
    let mut dout = s.clone_htod(&poisoned(input.len())).unwrap();
    {
        let (ip, _r) = din.device_ptr(&s);
        let (op, _w) = dout.device_ptr_mut(&s);
        // SAFETY: both allocations are live and sized as the probe reads and writes them.
        unsafe { raw::launch(&dev, &cp_plan(ip, op, 1)) }.unwrap();
    }
    assert_eq!(s.clone_dtoh(&dout).unwrap(), cp_expected(&input));
    let tile = ld_tile();
    let dtile = s.clone_htod(&tile).unwrap();
    for trans in [false, true] {
        let mut dres = s.clone_htod(&[0u32; 128]).unwrap();
        {
            let (tp, _r) = dtile.device_ptr(&s);
            let (rp, _w) = dres.device_ptr_mut(&s);
            // SAFETY: as above: 256 u16 in, 128 u32 out.
            unsafe { raw::launch(&dev, &ld_plan(tp, rp, trans)) }.unwrap();
        }
        assert_eq!(
            s.clone_dtoh(&dres).unwrap(),
            ld_expected(&tile, trans),
            "trans {trans}"
        );
    }
}
