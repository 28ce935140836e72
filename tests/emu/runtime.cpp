// The emulator's scheduler, registry and C entry points (see emu.hpp).
#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "emu.hpp"

namespace thor_emu {
// Counts thread blocks run: a static shared array poisoned in an earlier one is stale.
unsigned long long block_epoch = 0;
}  // namespace thor_emu

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

#if defined(__x86_64__)
// Minimal context switch: saves the callee-saved registers on the current stack, stores the
// stack pointer to *save, loads `next` and restores from it.
extern "C" void thor_emu_switch(void** save, void* next);
asm(R"(
    .text
    .globl thor_emu_switch
    .type thor_emu_switch,@function
thor_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size thor_emu_switch, .-thor_emu_switch
)");
#else
#error "the kernel emulator needs x86_64"
#endif

namespace {

enum State { READY, AT_BLOCK, AT_WARP, DONE };

// A cp.async copy issued and not yet waited for.
struct Copy {
    void* dst;
    const void* src;
    long group;
};

struct Fiber {
    void* sp = nullptr;
    State st = READY;
    uint3 tid{};
    int lane = 0, warp = 0;
    std::vector<Copy> copies;  // cp.async, in issue order
    long committed = 0;        // cp.async groups committed so far
};

constexpr size_t STACK = 256 * 1024;

struct Kernel {
    void* fn;
    thor_emu::Trampoline tr;
};

std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> r;
    return r;
}

struct Launch {
    std::vector<Fiber> fibers;
    std::unique_ptr<char[]> stacks;
    void* sched_sp = nullptr;
    int cur = -1;
    Kernel k{};
    void** args = nullptr;
    std::vector<unsigned char> smem;
    std::vector<unsigned char> slots;    // 32 * 8 bytes per warp
    std::vector<unsigned char> scratch;  // per warp
    size_t scratch_per_warp = 0;
    int or_pending = 0, or_result = 0;  // __syncthreads_or
    bool aborted = false;
    std::string error;
};

Launch* L = nullptr;

void to_scheduler(State s) {
    Fiber& f = L->fibers[L->cur];
    f.st = s;
    thor_emu_switch(&f.sp, L->sched_sp);
}

[[noreturn]] void fiber_entry() {
    L->k.tr(L->k.fn, L->args);
    if (!L->fibers[L->cur].copies.empty()) thor_emu::fail("cp.async copies never waited for at thread exit");
    for (;;) to_scheduler(DONE);
}

void start_fiber(Fiber& f, char* stack_base) {
    auto top = reinterpret_cast<uintptr_t>(stack_base + STACK) & ~uintptr_t(15);
    auto* p = reinterpret_cast<void**>(top);
    *--p = nullptr;                                        // fake return address of the entry
    *--p = reinterpret_cast<void*>(&fiber_entry);          // where the first switch returns
    for (int i = 0; i < 6; ++i) *--p = nullptr;            // rbp rbx r12 r13 r14 r15
    f.sp = p;
    f.st = READY;
    f.copies.clear();
    f.committed = 0;
}

std::string where(const Fiber& f) {
    const char* s = f.st == AT_BLOCK ? "__syncthreads" : f.st == AT_WARP ? "a warp collective"
                                                                         : f.st == DONE ? "exit" : "running";
    char buf[160];
    std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) of block (%u,%u,%u) waits at %s", f.tid.x,
                  f.tid.y, f.tid.z, blockIdx.x, blockIdx.y, blockIdx.z, s);
    return buf;
}

// Runs one thread block to completion. Returns false (error set) on a deadlock.
bool run_block(std::mt19937_64& rng, int order) {
    const int n = (int)L->fibers.size();
    for (int i = 0; i < n; ++i) start_fiber(L->fibers[i], L->stacks.get() + (size_t)i * STACK);
    std::memset(L->smem.data(), 0xff, L->smem.size());  // NaN poison
    ++thor_emu::block_epoch;                             // static shared arrays, lazily
    std::vector<int> seq(n);
    for (;;) {
        for (int i = 0; i < n; ++i) seq[i] = order == 1 ? n - 1 - i : i;
        if (order >= 2) std::shuffle(seq.begin(), seq.end(), rng);
        for (int i : seq) {
            Fiber& f = L->fibers[i];
            if (f.st != READY) continue;
            L->cur = i;
            threadIdx = f.tid;
            thor_emu_switch(&L->sched_sp, f.sp);
            if (L->aborted) return false;
        }
        bool released = false;
        const int warps = (n + 31) / 32;
        for (int w = 0; w < warps; ++w) {
            int live = 0, waiting = 0;
            for (int i = 32 * w; i < n && i < 32 * w + 32; ++i) {
                live += L->fibers[i].st != DONE;
                waiting += L->fibers[i].st == AT_WARP;
            }
            if (waiting > 0 && waiting == live) {
                for (int i = 32 * w; i < n && i < 32 * w + 32; ++i)
                    if (L->fibers[i].st == AT_WARP) L->fibers[i].st = READY;
                released = true;
            }
        }
        if (released) continue;
        int live = 0, at_block = 0;
        for (auto& f : L->fibers) {
            live += f.st != DONE;
            at_block += f.st == AT_BLOCK;
        }
        if (live == 0) return true;
        if (at_block == live) {
            L->or_result = L->or_pending;
            L->or_pending = 0;
            for (auto& f : L->fibers)
                if (f.st == AT_BLOCK) f.st = READY;
            continue;
        }
        // Some threads wait where others never arrive.
        std::string msg = "deadlock: barriers not reached by every live thread: ";
        int shown = 0;
        for (auto& f : L->fibers) {
            if (f.st == DONE) continue;
            if (shown++ < 4) msg += where(f) + "; ";
        }
        L->error = msg;
        return false;
    }
}

}  // namespace

namespace thor_emu {

void register_kernel(const char* name, void* fn, Trampoline t) { registry()[name] = Kernel{fn, t}; }

void* dynamic_smem() { return L->smem.data(); }

// The thread block each static shared array was last poisoned for.
static std::map<void*, unsigned long long> shared_epoch;

void fresh_shared(void* p, size_t bytes) {
    auto& e = shared_epoch[p];
    if (e != block_epoch) {
        std::memset(p, 0xff, bytes);
        e = block_epoch;
    }
}

void sync_block() { to_scheduler(AT_BLOCK); }
int sync_block_or(int pred) {
    if (pred) L->or_pending = 1;
    to_scheduler(AT_BLOCK);
    return L->or_result;
}
void sync_warp() { to_scheduler(AT_WARP); }
int lane() { return L->fibers[L->cur].lane; }
int warp() { return L->fibers[L->cur].warp; }
unsigned char* warp_slots() { return L->slots.data() + 256 * warp(); }
unsigned char* warp_scratch(size_t bytes) {
    if (bytes > L->scratch_per_warp) fail("warp scratch too small");
    return L->scratch.data() + L->scratch_per_warp * warp();
}
void fail(const char* what) {
    L->error = what;
    L->aborted = true;
    to_scheduler(DONE);
}

void cp_async16(void* dst, const void* src) {
    if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15)
        fail("cp.async: an address not 16-byte aligned");
    Fiber& f = L->fibers[L->cur];
    std::memset(dst, 0xff, 16);  // poison until the wait
    f.copies.push_back(Copy{dst, src, f.committed});
}
void cp_async_commit() { ++L->fibers[L->cur].committed; }
void cp_async_wait(int pending) {
    Fiber& f = L->fibers[L->cur];
    // Groups up to committed - pending - 1 complete; the open group is not waited for.
    const long done = f.committed - pending;
    std::vector<Copy> left;
    for (const Copy& c : f.copies) {
        if (c.group < done)
            std::memcpy(c.dst, c.src, 16);
        else
            left.push_back(c);
    }
    f.copies.swap(left);
}
void ldmatrix_x4(unsigned* r, const void* row, bool trans) {
    if (reinterpret_cast<uintptr_t>(row) & 15) fail("ldmatrix: a row address not 16-byte aligned");
    unsigned char* s = warp_slots();
    std::memcpy(s + 8 * lane(), &row, sizeof row);
    sync_warp();
    const int l = lane();
    for (int i = 0; i < 4; ++i) {
        unsigned short e[2];
        for (int h = 0; h < 2; ++h) {
            // Matrix i's rows are the addresses of lanes 8 i .. 8 i + 7.
            const int rr = trans ? 2 * (l % 4) + h : l / 4;
            const int cc = trans ? l / 4 : 2 * (l % 4) + h;
            const unsigned short* p;
            std::memcpy(&p, s + 8 * (8 * i + rr), sizeof p);
            e[h] = p[cc];
        }
        r[i] = (unsigned)e[0] | ((unsigned)e[1] << 16);
    }
    sync_warp();
}

namespace {
float tf32_trunc(float v) { return __uint_as_float(__float_as_uint(v) & 0xffffe000u); }

MmaLanes* gather(const unsigned* a, int na, const unsigned* b, const float* c) {
    auto* m = reinterpret_cast<MmaLanes*>(warp_scratch(sizeof(MmaLanes)));
    const int l = lane();
    for (int i = 0; i < na; ++i) m->a[l][i] = a[i];
    for (int i = 0; i < 2; ++i) m->b[l][i] = b[i];
    for (int i = 0; i < 4; ++i) m->c[l][i] = c[i];
    sync_warp();
    return m;
}

template <typename Conv>
void mma_k16(float* d, const unsigned* a, const unsigned* b, const float* c, Conv cv) {
    MmaLanes* m = gather(a, 4, b, c);
    float A[16][16], B[16][8];
    for (int ln = 0; ln < 32; ++ln) {
        const int g = ln >> 2, t = ln & 3;
        auto put = [&](int r, int k, unsigned reg) {
            A[r][k] = cv((unsigned short)(reg & 0xffff));
            A[r][k + 1] = cv((unsigned short)(reg >> 16));
        };
        put(g, 2 * t, m->a[ln][0]);
        put(g + 8, 2 * t, m->a[ln][1]);
        put(g, 2 * t + 8, m->a[ln][2]);
        put(g + 8, 2 * t + 8, m->a[ln][3]);
        B[2 * t][g] = cv((unsigned short)(m->b[ln][0] & 0xffff));
        B[2 * t + 1][g] = cv((unsigned short)(m->b[ln][0] >> 16));
        B[2 * t + 8][g] = cv((unsigned short)(m->b[ln][1] & 0xffff));
        B[2 * t + 9][g] = cv((unsigned short)(m->b[ln][1] >> 16));
    }
    const int g = lane() >> 2, t = lane() & 3;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const int r = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        float s = m->c[lane()][i];
        for (int k = 0; k < 16; ++k) s += A[r][k] * B[k][col];
        out[i] = s;
    }
    sync_warp();
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}
}  // namespace

void mma_m16n8k8_tf32(float* d, const unsigned* a, const unsigned* b, const float* c) {
    MmaLanes* m = gather(a, 4, b, c);
    float A[16][8], B[8][8];
    for (int ln = 0; ln < 32; ++ln) {
        const int g = ln >> 2, t = ln & 3;
        A[g][t] = tf32_trunc(__uint_as_float(m->a[ln][0]));
        A[g + 8][t] = tf32_trunc(__uint_as_float(m->a[ln][1]));
        A[g][t + 4] = tf32_trunc(__uint_as_float(m->a[ln][2]));
        A[g + 8][t + 4] = tf32_trunc(__uint_as_float(m->a[ln][3]));
        B[t][g] = tf32_trunc(__uint_as_float(m->b[ln][0]));
        B[t + 4][g] = tf32_trunc(__uint_as_float(m->b[ln][1]));
    }
    const int g = lane() >> 2, t = lane() & 3;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const int r = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        float s = m->c[lane()][i];
        for (int k = 0; k < 8; ++k) s += A[r][k] * B[k][col];
        out[i] = s;
    }
    sync_warp();
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

void mma_m16n8k16_f16(float* d, const unsigned* a, const unsigned* b, const float* c) {
    mma_k16(d, a, b, c, thor_half_to_float);
}
void mma_m16n8k16_bf16(float* d, const unsigned* a, const unsigned* b, const float* c) {
    mma_k16(d, a, b, c, thor_bf16_to_float);
}

}  // namespace thor_emu

// C entry point: launch `name` like cuLaunchKernel (args: one pointer per kernel argument),
// run to completion. order: 0 forward, 1 reverse, 2+ seeded shuffle. Returns 0, or -1 with
// the message copied to err.
extern "C" int thor_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz,
                               unsigned bx, unsigned by, unsigned bz, size_t smem, void** args,
                               int order, char* err, size_t err_len) {
    auto fail_with = [&](const std::string& m) {
        std::snprintf(err, err_len, "%s: %s", name, m.c_str());
        return -1;
    };
    auto it = registry().find(name);
    if (it == registry().end()) return fail_with("no such kernel in the emulator");
    const size_t n = (size_t)bx * by * bz;
    if (n == 0 || n > 1024) return fail_with("block size must be 1..1024 threads");
    if (smem > 232448) return fail_with("dynamic shared memory above the sm_90 limit");
    Launch launch;
    launch.k = it->second;
    launch.args = args;
    launch.fibers.resize(n);
    launch.stacks.reset(new char[n * STACK]);
    launch.smem.resize(smem > 0 ? smem : 16);
    const size_t warps = (n + 31) / 32;
    launch.slots.resize(warps * 256);
    launch.scratch_per_warp = sizeof(thor_emu::MmaLanes);
    launch.scratch.resize(warps * launch.scratch_per_warp);
    for (size_t i = 0; i < n; ++i) {
        auto& f = launch.fibers[i];
        f.tid = uint3{(unsigned)(i % bx), (unsigned)((i / bx) % by), (unsigned)(i / ((size_t)bx * by))};
        f.lane = (int)(i % 32);
        f.warp = (int)(i / 32);
    }
    Launch* prev = L;
    L = &launch;
    blockDim = dim3{bx, by, bz};
    gridDim = dim3{gx, gy, gz};
    std::mt19937_64 rng((uint64_t)order * 0x9e3779b97f4a7c15ull + 1);
    int rc = 0;
    for (unsigned z = 0; z < gz && rc == 0; ++z)
        for (unsigned y = 0; y < gy && rc == 0; ++y)
            for (unsigned x = 0; x < gx && rc == 0; ++x) {
                blockIdx = uint3{x, y, z};
                if (!run_block(rng, order)) rc = -1;
            }
    L = prev;
    if (rc != 0) return fail_with(launch.error);
    return 0;
}
