// The time loops of jaxrnn's ``impl="ffi"`` CPU backend, as XLA FFI custom
// calls: the LSTM, the GRU (either reset) and the Elman RNN, and the weight
// gradients after their backward loops.
//
// kernels/ffi.py builds this file on first use (with the jaxlib's FFI headers)
// and wraps each cell's pair of calls in a custom VJP:
//
//   jaxrnn_lstm_fwd(xs, w_ih, b, w_hh, h0, c0, lengths, ids)
//       -> a = [i f g o] (T*B, 4H), h carries (T, B, H), c carries (T, B, H), h_T, c_T
//       (ids (0,): b is the bias (4H,); ids (T*B,): b is a table (rows, 4H) and step t of
//       row b adds b[ids[t*B + b]]: an embedding's projected rows, with xs (T, B, 0))
//   jaxrnn_lstm_bwd(a, c carries, c0, dhs, dh_T, dc_T, w_hh, lengths)
//       -> dz (T*B, 4H, written over a), dh0, dc0
//   jaxrnn_gru_fwd(xs, w_ih, b, w_hh, b_hn, h0, lengths)
//       -> a = [r u n] (T*B, 3H), m = h_{t-1} w_hn + b_hn (T*B, H), h carries, h_T
//   jaxrnn_gru_bwd(a, m, h carries, h0, dhs, dh_T, w_hh, lengths)
//       -> dz_x = [dz_r dz_u dz_n] (T*B, 3H, written over a), dz_h = [dz_r dz_u dm] (T*B, 3H), dh0
//   jaxrnn_gru_before_fwd(xs, w_ih, b, w_hh, h0, lengths)
//       -> a = [r u n] (T*B, 3H), q = r h_{t-1} (T*B, H), h carries, h_T
//   jaxrnn_gru_before_bwd(a, h carries, h0, dhs, dh_T, w_hh, lengths)
//       -> dz = [dz_r dz_u dz_n] (T*B, 3H, written over a), dh0
//   jaxrnn_elman_fwd(xs, w_ih, b, w_hh, h0, lengths) -> h carries, h_T
//   jaxrnn_elman_bwd(h carries, dhs, dh_T, w_hh, lengths) -> dz (T*B, H), dh0
//
//   jaxrnn_weight_grads(xs, h carries, h0, dz_x, dz_h)
//       -> dW_ih = Σ x_tᵀ dz_x (I, G), db = Σ dz_x (G), dW_hh = Σ h_{t-1}ᵀ dz_h (H, G_h)
//
// after a backward loop (the LSTM and Elman pass their dz as both dz_x and
// dz_h); in XLA: dxs = dz(_x) w_ihᵀ, the GRU's db_hn = Σ dm, and, with the
// reset before the matmul, its products (dW_hh = [h_prevᵀ dz_{r,u}, qᵀ dz_n]).
//
//   jaxrnn_lstm_decode(table, w_hh0, w_up, b_up, w_out, b_out, h0, c0, logits0, noise, temperature)
//       -> tokens (N, B), logits (N, B, V) or (0,)
//
// samples N tokens from a stacked LSTM language model in one call: token i of
// row b is argmax(logits_i / temperature + noise[i, b]) (the argmax of logits_i
// when temperature <= 0), and is fed back as the next input (layer 0 reads its
// projected row of table, bias included); logits_0 is given.
//
// Why a custom call: XLA's CPU runtime runs a loop's ops one at a time on one
// core, and each step of the recurrence is one small matmul and a few
// elementwise ops. Here the threads of a call split it one of two ways
// (run_split). When the weights are a few MiB at most (the experiments' small
// models, and up to hidden 256), by batch rows: rows never meet, so a thread
// takes a chunk of rows and runs its whole loop alone, with no barrier, and a
// thread that starts late takes the chunks left. Otherwise a team splits the hidden units:
// member k owns units [u0, u1), keeps its columns of [w_ih; w_hh] packed in
// its own cache for all T steps, computes its units' gates and state update,
// and meets the other members at one barrier per step (the next step's matmul
// needs all of h_t; in the backward, all of dz_t). The threads are the
// calling thread plus tasks on XLA's intra-op thread pool (see run_on_pool):
// threads of our own competed for the cores with XLA's idle pool threads and
// ran up to 2x slower. The
// forward projects each step's input itself: no (T, B, G) projection is ever
// stored, and the (T, B, G) arrays it writes (the activations) ask for huge
// pages before their first touch. A saving LSTM forward whose weights exceed a
// core's L2 projects every step first instead, into the activations' rows
// (the ``projection`` attribute, hoists_projection).
//
// The cells, all float32 (G = gates x H, gates stacked as jaxrnn stacks them):
//   LSTM [i f g o]:  z = x_t w_ih + h_{t-1} w_hh + b;  i, f, o = sigmoid(z_i, z_f, z_o);
//                    g = tanh(z_g);  c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)
//   GRU [r u n]:     r, u = sigmoid(x_t w_i{r,u} + h_{t-1} w_h{r,u} + b_{r,u});
//                    reset after:  m = h_{t-1} w_hn + b_hn;  n = tanh(x_t w_in + b_n + r m)
//                    reset before: q = r h_{t-1};  n = tanh(x_t w_in + b_n + q w_hn)
//                    h_t = h_{t-1} + u (n - h_{t-1})
//   Elman:           h_t = act(x_t w_ih + h_{t-1} w_hh + b), act = tanh, relu or identity
// A step with t >= lengths[b] keeps row b's carry (its gradient passes through).
// Time runs T-1 .. 0 when ``reverse``.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include <sched.h>
#if defined(__linux__)
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <sys/mman.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------------------
// Vectors: GCC vector extensions (AVX-512 with -march=native where available).
// ---------------------------------------------------------------------------
constexpr int VL = 16;
typedef float vf __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t vi __attribute__((vector_size(64), aligned(4), may_alias));

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
inline vf load_n(const float* p, int n) {
  if (n == VL) return load(p);
  float tmp[VL] = {};
  std::memcpy(tmp, p, sizeof(float) * n);
  return load(tmp);
}
inline void store_n(float* p, vf v, int n) {
  if (n == VL) return store(p, v);
  float tmp[VL];
  store(tmp, v);
  std::memcpy(p, tmp, sizeof(float) * n);
}
// x limited to [lo, hi]; NaN stays NaN (as XLA's clamps keep it: a NaN input must reach the outputs).
inline vf vclamp(vf x, vf lo, vf hi) { return x < lo ? lo : (x > hi ? hi : x); }

// exp(x) to about 2 ulp on [-87, 88]: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial.
inline vf vexp(vf x) {
  x = vclamp(x, splat(-87.0f), splat(88.0f));
  const vf xr = x * 1.44269504088896341f;  // x / ln 2, rounded to the nearest integer n:
#if defined(__AVX512F__)
  // one rounding instruction, and 2^n applied by vscalefps (exact: p 2^n stays a normal float on [-87, 88])
  const vf n = (vf)_mm512_roundscale_ps((__m512)xr, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const vi ni = __builtin_convertvector(xr + (xr >= 0 ? splat(0.5f) : splat(-0.5f)), vi);
  const vf n = __builtin_convertvector(ni, vf);
#endif
  vf r = x - n * 0.693145751953125f;  // ln 2 in two parts (Cody-Waite)
  r = r - n * 1.428606765330187045e-06f;
  vf p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
#if defined(__AVX512F__)
  return (vf)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
  return p * (vf)((ni + 127) << 23);
#endif
}
// 1 / b, to about 1 ulp: with AVX-512, its 14-bit reciprocal estimate and one
// Newton step (a division of 16 lanes takes several times as long, and an LSTM
// step divides 7 times per unit: measured, the small models' forward was
// bound by it); elsewhere a division. Exact where saturation needs it:
// 1 / (1 + tiny) is 1.
inline vf vrecip(vf b) {
#if defined(__AVX512F__)
  const vf r = (vf)_mm512_rcp14_ps((__m512)b);
  return r * (2.0f - b * r);
#else
  return 1.0f / b;
#endif
}
inline vf vsigmoid(vf x) { return vrecip(1.0f + vexp(-x)); }
// tanh(x): an odd rational function of x (degree 13 over 6 in x², the
// coefficients of Eigen's float tanh, which XLA's CPU tanh uses too) for
// |x| < 7.9053, and exactly ±1 beyond (tanh rounds to ±1 in float32 past
// 9.01; in between it is within 2.7e-7 of 1): within 3.3e-7 relative of a
// float64 tanh over [-12, 12], and exactly ±1 where saturated gates of
// hand-set weights need it (a counter LSTM counts exactly). NaN stays NaN.
// Alone, twice as fast as the former 1 - 2 / (1 + e^{2|x|}) beyond |x| = 0.625
// (0.5 against 1.1 ns a value); in the loops, within the noise (single-thread
// forwards of B=32 T=200: LSTM H=64, GRU H=128, Elman H=64).
inline vf vtanh(vf x) {
  const vf c = splat(7.90531110763549805f);
  const vf x2 = x * x;
  vf p = splat(-2.76076847742355e-16f);
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  vf q = splat(1.19825839466702e-06f);
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  const vf t = vclamp(p * x * vrecip(q), splat(-1.0f), splat(1.0f));
  return x >= c ? splat(1.0f) : (x <= -c ? splat(-1.0f) : t);  // exactly ±1 (the reciprocal's estimate is not)
}

// tanh'(z) from y = tanh(z): 1 - y², as jaxrnn.cells.TANH.deriv (and so the xla backend) computes it.
inline vf dtanh(vf y) { return 1.0f - y * y; }

// ---------------------------------------------------------------------------
// A team of threads: the caller is member 0; members 1.. are parked workers.
// ---------------------------------------------------------------------------
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  // Sense-reversing spin barrier; yields the core after a short spin (an
  // oversubscribed machine must not spin away the other members' time).
  void wait(int& sense) {
    arrive(sense);
    wait_arrived(sense);
  }

  // The two halves of wait, for a member with work between them that needs
  // nothing the others write before the barrier: arrive (what this member
  // wrote is published to whoever returns from wait_arrived), then, after that
  // work, wait_arrived (every member has arrived; what they wrote is visible).
  // A member calls wait_arrived before it arrives again.
  void arrive(int& sense) {
    sense ^= 1;
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      flag_.store(sense, std::memory_order_release);
    }
  }

  void wait_arrived(int sense) {
    int spins = 0;
    while (flag_.load(std::memory_order_acquire) != sense) {
      if (++spins < 4000) {
        cpu_relax();
      } else {
        sched_yield();
      }
    }
  }

 private:
  const int n_;
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<int> flag_{0};
};

// ---------------------------------------------------------------------------
// Placement: a pool thread queued behind its caller.
// ---------------------------------------------------------------------------
// When a row-split call schedules its helper task, Linux often queues the
// woken pool thread on the core of the caller, which goes on working, while
// the other core idles: a thread that ran there a moment ago counts as
// cache-hot, and an idle core does not pull it. Traced on the 2-core EPYC VM
// (perf sched, B=64 T=200 H=32 LSTM fwd+bwd): the pool thread was woken
// while the other core still ran Python for 40 us, was queued on the caller's
// core, and waited there 2.5 ms, the whole call, with the other core idle; 14%
// of the forward calls ran on one thread so. So a caller whose helper has not
// started when it finishes its first chunk looks (/proc/self/task/<tid>/stat:
// state and last CPU) for its call threads (pool tasks and callers of this
// library, noted as they run) that are runnable on its own core, and if none
// of them runs on another core and no other call of this library is active,
// takes its core out of their affinity until the call ends: the kernel moves
// a queued thread at once. Alternating processes, 300 fwd+bwd calls each,
// moving against not: LSTM B=64 T=50 H=64 means 2.63-2.74 against
// 3.05-3.11 ms; B=64 T=200 H=32 4.19-4.43 against 5.05-6.47 ms; Elman B=64
// T=50 H=64 medians 0.77 against 0.81-1.23 ms; GRU B=64 T=200 I=1 H=64 10.0
// and 11.3 against 13.4 and 11.2 ms; short-handed calls 3-10x fewer. The
// bidirectional 2-layer LSTM (B=16 T=64 H=128): medians 19.7-20.3 against
// 20.3-20.5 ms in three of four pairs (moving also while another call ran made
// it 2-4% slower in seven pairs). The base point never moves (its helper
// starts within the first chunk).
// (Earlier tries, in the README: a helper lingering after its call, and a
// caller moving itself to the other core, which shares it with whatever runs
// there; this moves only threads that are waiting anyway.)
constexpr int kMaxNotedThreads = 16;
constexpr int kMaxMovedThreads = 4;
std::atomic<int> noted_count{0};
std::atomic<int> noted_tids[kMaxNotedThreads];
std::atomic<int> active_calls{0};        // this library's calls now running (ActiveCall), one thread or more
std::atomic<int64_t> moved_threads{0};   // threads moved off a caller's core (team_stats)

// A call of this library, counted while it runs.
struct ActiveCall {
  ActiveCall() { active_calls.fetch_add(1, std::memory_order_acq_rel); }
  ~ActiveCall() { active_calls.fetch_sub(1, std::memory_order_acq_rel); }
};

#if defined(__linux__)
inline int this_tid() { return static_cast<int>(syscall(SYS_gettid)); }

// Notes the calling thread (once) as one that runs this library's calls.
void note_thread() {
  thread_local bool noted = false;
  if (noted) return;
  noted = true;
  const int i = noted_count.fetch_add(1, std::memory_order_acq_rel);
  if (i < kMaxNotedThreads) noted_tids[i].store(this_tid(), std::memory_order_release);
}

// The scheduler state ('R', 'S', ...) and last CPU of thread tid of this
// process; false if its /proc entry cannot be read (the thread exited).
bool thread_state(int tid, char* state, int* cpu) {
  char path[64], buf[1024];
  std::snprintf(path, sizeof path, "/proc/self/task/%d/stat", tid);
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return false;
  buf[n] = 0;
  const char* p = std::strrchr(buf, ')');  // the name may hold spaces and parentheses
  if (p == nullptr || p[1] == 0) return false;
  p += 2;
  *state = *p;
  for (int field = 3; *p != 0 && field < 39; ++p) field += *p == ' ';  // field 39: processor
  if (*p == 0) return false;
  *cpu = std::atoi(p);
  return true;
}

struct MovedThread {
  int tid;
  cpu_set_t affinity;  // to restore
};

// Takes `cpu` out of thread tid's affinity (keeping at least one CPU); true if done.
bool move_off(int tid, int cpu, MovedThread* moved) {
  cpu_set_t mask;
  if (sched_getaffinity(tid, sizeof mask, &moved->affinity) != 0) return false;
  mask = moved->affinity;
  CPU_CLR(cpu, &mask);
  if (CPU_COUNT(&mask) == 0 || sched_setaffinity(tid, sizeof mask, &mask) != 0) return false;
  moved->tid = tid;
  return true;
}

void restore(const MovedThread* moved, int n) {
  for (int i = 0; i < n; ++i) sched_setaffinity(moved[i].tid, sizeof moved[i].affinity, &moved[i].affinity);
}

// Moves the noted threads queued on the caller's core off it, unless one of
// them runs on another core (then that core is busy with this library's
// work). Returns how many moved (their affinities in moved[]).
int move_queued_threads(MovedThread* moved) {
  const int cpu = sched_getcpu(), self = this_tid();
  if (cpu < 0) return 0;
  const int n = std::min(noted_count.load(std::memory_order_acquire), kMaxNotedThreads);
  int queued[kMaxNotedThreads], count = 0;
  for (int i = 0; i < n; ++i) {
    const int tid = noted_tids[i].load(std::memory_order_acquire);
    char state;
    int last;
    if (tid == 0 || tid == self || !thread_state(tid, &state, &last) || state != 'R') continue;
    if (last != cpu) return 0;
    queued[count++] = tid;
  }
  int k = 0;
  for (int i = 0; i < count && k < kMaxMovedThreads; ++i) k += move_off(queued[i], cpu, &moved[k]);
  moved_threads.fetch_add(k, std::memory_order_relaxed);
  return k;
}
#else
inline void note_thread() {}
struct MovedThread {};
inline int move_queued_threads(MovedThread*) { return 0; }
inline void restore(const MovedThread*, int) {}
#endif

// Runs job(k, n) on a team formed on XLA's intra-op thread pool. Tasks are
// scheduled on the pool, and a task joins the team when it starts; the team is
// closed with the members present after at most max_wait_us (a small fraction
// of the call), so that a busy pool cannot stall the call, and late tasks find
// it closed and return at once. Two ways, both measured on 2 cores:
//
// * caller_works (training, save / backward calls): the caller is member 0 and
//   n - 1 tasks are scheduled. In a differentiated program the custom call
//   runs on one of XLA's own threads, and this was fastest (B=64 T=200 H=64
//   fwd+bwd: 8 ms, against 11-13 ms the other way).
// * otherwise (inference): n tasks are scheduled and the caller, often
//   Python's thread, sleeps while they run, joining only if they have not all
//   started within kQuickJoinUs. As a member beside one pool task it competed
//   with XLA's idle-spinning pool threads for the cores: at B=8 T=64 H=256 one
//   call in four stalled for several 4 ms scheduler slices (mean 3.9 ms against
//   a median of 1.5; sleeping: mean 1.6 ms).
constexpr int64_t kQuickJoinUs = 50;

struct Formation {
  static constexpr int kClosed = -(1 << 20);
  std::atomic<int> slots{0};     // members joined so far (kClosed + ... once closed)
  std::atomic<int> team{0};      // the final size, set when closed
  std::atomic<bool> go{false};   // closed and sized: joined members may run
  std::atomic<int> finished{0};  // members done
  std::unique_ptr<Barrier> barrier;
  const std::function<void(int, int, Barrier&)>* job = nullptr;
  std::mutex mutex;              // with cv: the caller's sleep
  std::condition_variable cv;

  // A member slot (0, 1, ...), or -1 once the team is closed.
  int join() {
    int v = slots.load(std::memory_order_acquire);
    while (v >= 0 && !slots.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) {
    }
    return v;
  }
  void wake() {
    std::lock_guard<std::mutex> lock(mutex);
    cv.notify_all();
  }
};

using Job = std::function<void(int, int, Barrier&)>;

// Calls that formed a team, and those that ran with fewer members than planned
// (read by ffi.team_stats(): a benchmark can tell a short-handed call from a slow kernel).
std::atomic<int64_t> team_calls{0}, short_handed_calls{0};

void run_on_pool(ffi::ThreadPool& pool, int n, double max_wait_us, bool caller_works, const Job& job) {
  ActiveCall active;  // one thread too: a call beside it must not move a thread onto its core
  if (n <= 1) {
    Barrier alone(1);
    return job(0, 1, alone);
  }
  auto state = std::make_shared<Formation>();
  state->job = &job;
  int mine = caller_works ? state->join() : -1;
  for (int i = mine >= 0 ? 1 : 0; i < n; ++i) {
    pool.Schedule([state, n] {
      const int k = state->join();
      if (k < 0) return;  // closed without us
      if (k + 1 == n) state->wake();
      while (!state->go.load(std::memory_order_acquire)) cpu_relax();
      (*state->job)(k, state->team.load(std::memory_order_relaxed), *state->barrier);
      if (state->finished.fetch_add(1, std::memory_order_acq_rel) + 1 == state->team.load(std::memory_order_relaxed)) {
        state->wake();
      }
    });
  }
  // All n tasks start within kQuickJoin when the pool is idle and the caller is
  // not one of its threads; otherwise the caller joins, and waits for the rest
  // up to max_wait_us (a small fraction of the call).
  if (mine < 0) {
    const auto quick = std::chrono::microseconds(std::min<int64_t>(kQuickJoinUs, static_cast<int64_t>(max_wait_us)));
    std::unique_lock<std::mutex> lock(state->mutex);
    state->cv.wait_for(lock, quick, [&] { return state->slots.load(std::memory_order_acquire) >= n; });
  }
  if (state->slots.load(std::memory_order_acquire) < n) {
    if (mine < 0) mine = state->join();
    const auto start = std::chrono::steady_clock::now();
    for (int spins = 0; state->slots.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < 2000) {
        cpu_relax();
        continue;
      }
      if (std::chrono::steady_clock::now() - start > std::chrono::duration<double, std::micro>(max_wait_us)) break;
      sched_yield();
    }
  }
  const int team = state->slots.exchange(Formation::kClosed, std::memory_order_acq_rel);
  team_calls.fetch_add(1, std::memory_order_relaxed);
  if (team < n) short_handed_calls.fetch_add(1, std::memory_order_relaxed);
  state->team.store(team, std::memory_order_relaxed);
  state->barrier = std::make_unique<Barrier>(team);
  state->go.store(true, std::memory_order_release);
  if (mine >= 0) {
    job(mine, team, *state->barrier);
    state->finished.fetch_add(1, std::memory_order_acq_rel);
  }
  // The others finish about when the caller does: spin a little, then sleep.
  for (int spins = 0; spins < 4000 && state->finished.load(std::memory_order_acquire) < team; ++spins) cpu_relax();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->cv.wait(lock, [&] { return state->finished.load(std::memory_order_acquire) >= team; });
}

// Scratch memory, 64-byte aligned, kept between calls.
struct Scratch {
  float* get(size_t n) {
    if (n > size) {
      std::free(data);
      size = (n + 15) / 16 * 16;
      data = static_cast<float*>(std::aligned_alloc(64, size * sizeof(float)));
    }
    return data;
  }
  Scratch() = default;
  Scratch(Scratch&& other) noexcept : data(other.data), size(other.size) { other.data = nullptr, other.size = 0; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(data); }
  float* data = nullptr;
  size_t size = 0;
};

// A member's scratch: thread-local, so that calls XLA runs concurrently (the
// two directions of a bidirectional layer may) never share buffers; a thread
// serves one member of one call at a time.
Scratch& scratch(int which) {
  thread_local Scratch slots[8];
  return slots[which];
}

// ---------------------------------------------------------------------------
// C (rows x 32 per panel) = A (rows x K, row stride lda) @ P (K x 32 panels).
// ---------------------------------------------------------------------------
constexpr int NR = 2 * VL;  // panel width
constexpr int MR = 8;       // rows per register block
// The least matmul work per member and step worth a barrier (tuned on 2 cores,
// fwd+bwd, median / mean of 300 calls, against 1e6 before: LSTM B=32 T=200
// H=64 3.2-3.5 / 3.7-4.8 ms against 6.3-7.2 / 9.8-10.1; GRU B=64 H=64 7.2-7.5
// against 9.6-10.3 ms; an Elman step of B=64 H=64, 0.66 MFLOP, stays on one
// member: two were no faster and stalled more often).
constexpr double kMinFlopsPerMember = 3.5e5;
// The packed weights one member should hold (half of a 1 MiB L2 cache).
constexpr double kMaxWeightBytesPerMember = 512.0 * 1024;

// acc{0,1}[r] += Σ_k a[r, k] p[k, 0:NR] over K rows of a (row stride lda) and of a panel p.
template <int R>
inline void accumulate(const float* a, int lda, int K, const float* p, vf* acc0, vf* acc1) {
  for (int k = 0; k < K; ++k) {
    const vf b0 = load(p + k * NR), b1 = load(p + k * NR + VL);
    for (int r = 0; r < R; ++r) {
      const float x = a[r * lda + k];
      acc0[r] += x * b0;
      acc1[r] += x * b1;
    }
  }
}

// C (rows x NR) = [A1 | A2] (rows x (K1 + K2)) @ P ((K1 + K2) x NR): A1 and A2
// are two row-major operands side by side (A2 may be absent, K2 = 0). With
// kAcc, C += instead: the sums start from C, as they would have reached it
// after a first operand (the same additions in the same order).
template <int R, bool kAcc = false>
inline void micro(const float* a1, int lda1, int K1, const float* a2, int lda2, int K2, const float* p, float* c,
                  int ldc) {
  vf acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) {
    acc0[r] = kAcc ? load(c + r * ldc) : splat(0.0f);
    acc1[r] = kAcc ? load(c + r * ldc + VL) : splat(0.0f);
  }
  accumulate<R>(a1, lda1, K1, p, acc0, acc1);
  accumulate<R>(a2, lda2, K2, p + static_cast<size_t>(K1) * NR, acc0, acc1);
  for (int r = 0; r < R; ++r) {
    store(c + r * ldc, acc0[r]);
    store(c + r * ldc + VL, acc1[r]);
  }
}

// C (rows x npanels NR, row stride ldc) = [A1 | A2] @ panels, each panel (K1 + K2) x NR (C += with kAcc).
template <bool kAcc = false>
void gemm_rows(const float* a1, int lda1, int K1, const float* a2, int lda2, int K2, int rows, const float* panels,
               int npanels, float* c, int ldc) {
  const size_t K = static_cast<size_t>(K1) + K2;
  for (int j = 0; j < npanels; ++j) {
    const float* p = panels + j * K * NR;
    float* cj = c + j * NR;
    int r = 0;
    for (; r + MR <= rows; r += MR) {
      micro<MR, kAcc>(a1 + r * lda1, lda1, K1, a2 + r * lda2, lda2, K2, p, cj + r * ldc, ldc);
    }
#define JAXRNN_TAIL(R) \
  case R: micro<R, kAcc>(a1 + r * lda1, lda1, K1, a2 + r * lda2, lda2, K2, p, cj + r * ldc, ldc); break;
    switch (rows - r) {
      JAXRNN_TAIL(7) JAXRNN_TAIL(6) JAXRNN_TAIL(5) JAXRNN_TAIL(4) JAXRNN_TAIL(3) JAXRNN_TAIL(2) JAXRNN_TAIL(1)
      default: break;
    }
#undef JAXRNN_TAIL
  }
}

// Asks Linux for transparent huge pages on the 2 MiB-aligned inside of a large
// fresh output buffer before its first touch: XLA's CPU runtime allocates each
// call's buffers afresh, and each 4 KiB page of a fresh buffer otherwise costs a
// page fault (about 15 ms for a 32 MiB buffer on the development machine).
void advise_huge_pages(void* data, size_t bytes) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Hidden units [u0, u1) of member k of n: blocks of 16 units, split evenly.
void unit_range(int H, int k, int n, int* u0, int* u1) {
  const int blocks = (H + VL - 1) / VL;
  *u0 = std::min(H, blocks * k / n * VL);
  *u1 = std::min(H, blocks * (k + 1) / n * VL);
}

// How many members share a call: at most ``requested`` (0: the size of XLA's
// intra-op pool) and one per 16 hidden units; then enough that each member's
// slice of the packed weights (K x gates H floats) stays in a core's L2 cache
// (a thin batch streams the weights every step), but no more than each
// member's share of a step's matmul (B x K by K x gates H) pays for the barrier
// that ends it.
int team_size(int B, int H, int K, int gates, int requested, ffi::ThreadPool& pool) {
  const double flops = 2.0 * B * K * gates * H;
  const double weight_bytes = 4.0 * K * gates * H;
  int n = static_cast<int>(pool.num_threads());
  if (requested > 0) n = std::min(n, requested);
  n = std::min(n, (H + VL - 1) / VL);
  const int wanted = std::max(static_cast<int>(flops / kMinFlopsPerMember),
                              static_cast<int>(std::ceil(weight_bytes / kMaxWeightBytesPerMember)));
  return std::max(1, std::min(n, wanted));
}

// How long the caller waits for its team to join: 2% of the call's time on one
// core (at about 100 GFLOP/s), between 50 µs and 2 ms.
double join_wait_us(int T, int B, int H, int K, int gates) {
  const double single_core_us = 2.0 * T * B * K * gates * H / 1.0e5;
  return std::min(2000.0, std::max(50.0, 0.02 * single_core_us));
}

// Packs ngroups groups of a member's nu columns of [top; bottom] ((K1 + K2) rows
// of row stride ld; either part may be absent, K = 0) into panels of NR
// columns: column q of the result is source column col0 + (q / nu) H + u0 + q % nu.
const float* pack_columns(Scratch& s, const float* top, int K1, const float* bottom, int K2, int ld, int col0,
                          int ngroups, int H, int u0, int nu, int* npanels) {
  const int K = K1 + K2, cols = ngroups * nu;
  *npanels = (cols + NR - 1) / NR;
  float* packed = s.get(static_cast<size_t>(*npanels) * K * NR + NR);
  // Row kk of the source is read once, front to back: each group's nu units are
  // contiguous there, and land in runs of at most NR lanes of consecutive panels.
  for (int kk = 0; kk < K; ++kk) {
    const float* src = kk < K1 ? top + static_cast<size_t>(kk) * ld : bottom + static_cast<size_t>(kk - K1) * ld;
    for (int g = 0; g < ngroups; ++g) {
      const float* run = src + col0 + static_cast<size_t>(g) * H + u0;
      for (int u = 0, col = g * nu; u < nu;) {
        const int j = col / NR, q = col % NR, n = std::min(nu - u, NR - q);
        std::memcpy(packed + (static_cast<size_t>(j) * K + kk) * NR + q, run + u, sizeof(float) * n);
        u += n;
        col += n;
      }
    }
    if (cols % NR != 0) {
      const int j = cols / NR, q = cols % NR;
      std::memset(packed + (static_cast<size_t>(j) * K + kk) * NR + q, 0, sizeof(float) * (NR - q));
    }
  }
  return packed;
}

// Packs rows u0 .. u0 + nu of w (H rows of stride ld), columns col0 .. col0 + K,
// transposed into panels of NR columns: panel j, row kk (of K), column q holds
// w[u0 + j NR + q, col0 + kk] (the backward's dh_{t-1}[:, units] = dz_t w[units, :]ᵀ).
// Blocks of 16 columns of w (a cache line of each of a panel's rows) at a time:
// reading a column of w down its rows (a stride of 4 G bytes) took 601 us for
// H = 256 (G = 1024), against 103 us so (fastest of 50, alone on the EPYC VM).
const float* pack_rows_transposed(Scratch& s, const float* w, int ld, int col0, int K, int u0, int nu, int* npanels) {
  constexpr int kColumns = 16;
  *npanels = (nu + NR - 1) / NR;
  float* packed = s.get(static_cast<size_t>(*npanels) * K * NR + NR);
  for (int j = 0; j < *npanels; ++j) {
    float* panel = packed + static_cast<size_t>(j) * K * NR;
    const int nq = std::min(NR, nu - j * NR);
    for (int k0 = 0; k0 < K; k0 += kColumns) {
      const int k1 = std::min(K, k0 + kColumns);
      for (int q = 0; q < nq; ++q) {
        const float* row = w + static_cast<size_t>(u0 + j * NR + q) * ld + col0;
        for (int kk = k0; kk < k1; ++kk) panel[static_cast<size_t>(kk) * NR + q] = row[kk];
      }
      for (int q = nq; q < NR; ++q) {
        for (int kk = k0; kk < k1; ++kk) panel[static_cast<size_t>(kk) * NR + q] = 0.0f;
      }
    }
  }
  return packed;
}

struct Dims {
  int T, B, H, I;
};

// The tile of a call's loop one member computes: hidden units [u0, u1) of batch rows [b0, b1).
struct Part {
  int u0, u1, b0, b1;
  int chunk = 0;  // which chunk of rows (run_row_chunks), 0 for a team's member
};

// gemm_rows over the rows [b0, b1) of row-major operands that hold every row of the batch.
template <bool kAcc = false>
inline void gemm_part(const Part& part, const float* a1, int lda1, int K1, const float* a2, int lda2, int K2,
                      const float* panels, int npanels, float* c, int ldc) {
  const size_t b0 = part.b0;
  gemm_rows<kAcc>(a1 + b0 * lda1, lda1, K1, a2 != nullptr ? a2 + b0 * lda2 : nullptr, lda2, K2, part.b1 - part.b0,
                  panels, npanels, c + b0 * ldc, ldc);
}

// How a call's loop is split (the ``split`` attribute).
enum Split : int32_t { kSplitAuto = 0, kSplitUnits = 1, kSplitRows = 2 };

// Rows of the batch never meet: a chunk of rows can run its whole loop, all
// T steps, alone. When the weights take a few MiB at most (a member reads all
// of them every step), chunks of rows need no barrier at all, and a pool thread
// that starts late takes what is left instead of stalling a team. Chunks have
// at least kMinChunkRows rows (one register block of the matmul), and there
// are up to kChunksPerThread per thread, so that a late thread leaves the
// early ones work to take.
constexpr int kMinChunkRows = 8;
constexpr int kChunksPerThread = 2;
// Below this much matmul work per call, one thread (scheduling a task costs microseconds).
constexpr double kMinRowSplitFlops = 2.0e6;
// The most packed weights a chunk of rows streams every step (as K x gates x H
// floats). Beyond one core's L2 (1 MiB) rows still beat a team: a team meets at
// a barrier every step, and one member held up (a page fault, an interrupt)
// holds up the other. Measured on 2 cores against 512 KiB, median of the
// medians of 4 alternating processes, fwd+bwd: GRU B=32 T=256 I=128 H=256 122
// against 137 ms, the bidirectional 2-layer LSTM B=16 T=64 H=128 28 against
// 32, the character LM's training step (LSTM 2x256, B=32 T=128) 168 against
// 175, the LSTM at the GRU's shape a tie (138); forward only: 7-16% faster.
// One LSTM at H=512 (5.2 MiB) was a tie, at H=1024 (19 MiB) rows were 1.4x slower.
constexpr double kMaxRowSplitWeightBytes = 4.0 * 1024 * 1024;

using PartJob = std::function<void(const Part&, Barrier&)>;

struct Chunks {
  std::atomic<int> next{0};     // the next chunk to take
  std::atomic<int> done{0};     // chunks finished
  std::atomic<int> started{0};  // pool tasks started
  std::atomic<int> workers{0};  // threads that took a chunk
  int count = 0, B = 0, H = 0, tasks = 0;
  const PartJob* job = nullptr;
  std::mutex mutex;
  std::condition_variable cv;
  MovedThread moved[kMaxMovedThreads];  // threads the caller moved off its core (see Placement)
  int moved_count = 0;

  // Takes and runs chunks until none is left. The job is touched only while a
  // chunk is unfinished, that is while the caller still waits. A working
  // caller whose helpers have not all started by the end of its first chunk
  // moves threads queued on its core (move_queued_threads).
  void work(bool caller = false) {
    Barrier alone(1);
    bool counted = false, placed = !caller;
    for (int c = next.fetch_add(1, std::memory_order_acq_rel); c < count;
         c = next.fetch_add(1, std::memory_order_acq_rel)) {
      if (counted && !placed) {
        placed = true;
        if (started.load(std::memory_order_acquire) < tasks && active_calls.load(std::memory_order_acquire) == 1) {
          moved_count = move_queued_threads(moved);
        }
      }
      if (!counted) {
        workers.fetch_add(1, std::memory_order_relaxed);
        counted = true;
      }
      const int b0 = static_cast<int>(static_cast<int64_t>(B) * c / count);
      const int b1 = static_cast<int>(static_cast<int64_t>(B) * (c + 1) / count);
      (*job)(Part{0, H, b0, b1, c}, alone);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == count) {
        std::lock_guard<std::mutex> lock(mutex);
        cv.notify_all();
      }
    }
  }
};

// Runs job over `count` chunks of rows with up to `threads` threads: the caller
// and threads - 1 pool tasks (caller_works), or `threads` pool tasks that the
// caller joins only if they have not all started within kQuickJoinUs (as in
// run_on_pool). A task that starts after the last chunk was taken returns at once.
void run_row_chunks(ffi::ThreadPool& pool, int threads, int count, int B, int H, bool caller_works,
                    const PartJob& job) {
  ActiveCall active;
  note_thread();
  auto state = std::make_shared<Chunks>();
  state->count = count;
  state->B = B;
  state->H = H;
  state->job = &job;
  const int tasks = caller_works ? threads - 1 : threads;
  state->tasks = tasks;
  for (int i = 0; i < tasks; ++i) {
    pool.Schedule([state, tasks] {
      note_thread();
      if (state->started.fetch_add(1, std::memory_order_acq_rel) + 1 == tasks) {  // the sleeping caller may go on
        std::lock_guard<std::mutex> lock(state->mutex);
        state->cv.notify_all();
      }
      state->work();
    });
  }
  if (!caller_works) {
    std::unique_lock<std::mutex> lock(state->mutex);
    state->cv.wait_for(lock, std::chrono::microseconds(kQuickJoinUs),
                       [&] { return state->started.load(std::memory_order_acquire) >= tasks; });
  }
  if (caller_works || state->started.load(std::memory_order_acquire) < tasks) state->work(caller_works);
  for (int spins = 0; spins < 4000 && state->done.load(std::memory_order_acquire) < count; ++spins) cpu_relax();
  {
    std::unique_lock<std::mutex> lock(state->mutex);
    state->cv.wait(lock, [&] { return state->done.load(std::memory_order_acquire) >= count; });
  }
  restore(state->moved, state->moved_count);
  team_calls.fetch_add(1, std::memory_order_relaxed);
  if (state->workers.load(std::memory_order_relaxed) < threads) {
    short_handed_calls.fetch_add(1, std::memory_order_relaxed);
  }
}

// Runs a call's loop: split by batch rows (run_row_chunks) when the weights
// fit one member's cache, else by hidden units (team_size and run_on_pool: a
// team that meets at a barrier every step). K is the depth of the step's
// matmul (the rows of the packed weights), gates the columns per hidden unit.
void run_split(ffi::ThreadPool& pool, const Dims& d, int K, int gates, int threads, int32_t split, bool caller_works,
               const PartJob& job) {
  int n = static_cast<int>(pool.num_threads());
  if (threads > 0) n = std::min(n, threads);
  const double weight_bytes = 4.0 * K * gates * d.H;
  const double flops = 2.0 * d.T * d.B * K * gates * d.H;
  const int max_chunks = std::max(1, d.B / kMinChunkRows);
  const bool rows = split == kSplitRows ||
                    (split == kSplitAuto && n >= 2 && max_chunks >= 2 && weight_bytes <= kMaxRowSplitWeightBytes &&
                     flops >= kMinRowSplitFlops);
  if (rows) {
    const int count = std::min(max_chunks, std::max(1, n) * kChunksPerThread);
    const int members = std::min(n, count);
    if (members <= 1) {
      ActiveCall active;
      Barrier alone(1);
      return job(Part{0, d.H, 0, d.B}, alone);
    }
    return run_row_chunks(pool, members, count, d.B, d.H, caller_works, job);
  }
  const int members = team_size(d.B, d.H, K, gates, threads, pool);
  run_on_pool(pool, members, join_wait_us(d.T, d.B, d.H, K, gates), caller_works,
              [&](int k, int m, Barrier& barrier) {
                int u0, u1;
                unit_range(d.H, k, m, &u0, &u1);
                job(Part{u0, u1, 0, d.B}, barrier);
              });
}

// ---------------------------------------------------------------------------
// Weight gradients: the large products after a backward loop.
// ---------------------------------------------------------------------------
// dW_ih = Σ_k x_kᵀ dz_x[k], db = Σ_k dz_x[k] and dW_hh = Σ_k p_kᵀ dz_h[k] over
// the T B rows k = t B + b, where p_k is the carry row b started step t from
// (h_{t-1}: hs[t - 1], or h0 at the first step; reversed, hs[t + 1], or h0 at
// t = T - 1), read in place (no shifted copy of hs). XLA's CPU dot takes these
// transposed-operand products (K = T B deep, M and N small) slower than this
// loop, which keeps each output tile in registers for a block of rows and
// reads each block of x or h_{t-1} once for all of a thread's panels
// (measured alone, 2 cores, fastest of 300 calls: T B = 6400, I + H = 80,
// G = 256: 1.6 against 2.1 ms with XLA's shift, dots and sum; the base point's
// 8192 rows, 384 x 1024: 36 against 40 ms). Threads take groups of 32-column
// output panels (no reduction between them). Each block of the A operand is
// packed tile-major first (pack_grad_rows): the character LM's second layer
// (4096 rows, 512 x 1024), medians of 40 calls in alternating processes, 25.9
// and 27.8 against 31.3 and 33.5 ms unpacked (XLA's dots of the same product:
// 26.8-31.9 ms); blocks of 256 rows were no faster.
constexpr int kGradRowBlock = 128;  // rows of dz per block: a packed 128 x 32 block is 16 KiB (L1)
constexpr int kGradPanelGroup = 8;  // dz's panels packed together: 8 blocks are 128 KiB (L2)
constexpr double kMinGradSplitFlops = 1.0e6;

// acc (MR rows of 32 columns, row stride 32) += aᵀ b over K rows: a packed K x MR (MR consecutive floats a
// row: the block's A operand, tile-major, see pack_grad_rows), b K x 32 of row stride ldb.
inline void grad_tile(const float* a, int K, const float* b, int ldb, float* acc) {
  vf c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    c0[r] = load(acc + r * NR);
    c1[r] = load(acc + r * NR + VL);
  }
  for (int k = 0; k < K; ++k) {
    const vf b0 = load(b + static_cast<size_t>(k) * ldb), b1 = load(b + static_cast<size_t>(k) * ldb + VL);
    const float* ak = a + static_cast<size_t>(k) * MR;
    for (int r = 0; r < MR; ++r) {
      c0[r] += ak[r] * b0;
      c1[r] += ak[r] * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store(acc + r * NR, c0[r]);
    store(acc + r * NR + VL, c1[r]);
  }
}

// Rows [k0, k1) of dz's panels [pc, pc + ng) (32 columns each, the last zero-padded past G) into ng
// blocks of (k1 - k0) x 32, panel after panel; sum[2 jj ..] += each row of panel jj. Rows outermost: a
// row's ng panels are one contiguous run of dz, where a panel at a time read 128 bytes a row at a
// stride of 4 G bytes, which the prefetchers do not follow (see grad_panels).
void pack_grad_blocks(const float* dz, int G, int k0, int k1, int pc, int ng, float* blocks, vf* sum) {
  const size_t kb = k1 - k0;
  for (int k = k0; k < k1; ++k) {
    const float* src = dz + static_cast<size_t>(k) * G;
    for (int jj = 0; jj < ng; ++jj) {
      const int col = (pc + jj) * NR, m = std::min(NR, G - col);
      float* dst = blocks + (jj * kb + (k - k0)) * NR;
      const vf v0 = load_n(src + col, std::min(m, VL)), v1 = m > VL ? load_n(src + col + VL, m - VL) : splat(0.0f);
      store(dst, v0);
      store(dst + VL, v1);
      if (sum != nullptr) {
        sum[2 * jj] += v0;
        sum[2 * jj + 1] += v1;
      }
    }
  }
}

struct GradOperands {
  int T, B, I, H, Gx, Gh;
  bool reverse;
  const float *xs, *hs, *h0, *dzx, *dzh;
  float *dw_ih, *db, *dw_hh;
};

// Row k of the A operand of [dW_ih; db] (input: x_k) or of dW_hh (p_k = hs[k - B] forward, hs[k + B]
// reversed, and h0 for the rows of the walk's first step).
inline const float* grad_operand_row(const GradOperands& o, bool input, int k) {
  if (input) return o.xs + static_cast<size_t>(k) * o.I;
  const int first0 = o.reverse ? (o.T - 1) * o.B : 0;
  if (k >= first0 && k < first0 + o.B) return o.h0 + static_cast<size_t>(k - first0) * o.H;
  return o.hs + (static_cast<size_t>(k) + (o.reverse ? o.B : -o.B)) * o.H;
}

// Rows [k0, k1) of the A operand (M columns) into tiles of MR columns, each (k1 - k0) x MR with its MR
// values of a row consecutive (the last tile zero-padded): grad_tile then reads one short run per row
// instead of MR floats of a row M apart from the next row's (strides of a page every few rows, which
// the prefetchers do not follow). A full tile's row is one constant-size move: a call of memcpy per
// 32 bytes took 7.6% of the CPU samples of a small Elman RNN's fwd+bwd (B=64 T=50 I=16 H=64), 1.0% after.
// A tile holds `ld` rows (at least k1 - k0; 0: exactly those), so that several runs of rows can share it.
void pack_grad_rows(const GradOperands& o, bool input, int M, int k0, int k1, float* apack, int ld = 0) {
  const int kb = ld > 0 ? ld : k1 - k0, tiles = (M + MR - 1) / MR;
  for (int k = k0; k < k1; ++k) {
    const float* src = grad_operand_row(o, input, k);
    for (int t = 0; t < tiles; ++t) {
      float* dst = apack + (static_cast<size_t>(t) * kb + (k - k0)) * MR;
      const int m = std::min(MR, M - t * MR);
      if (m == MR) {
        std::memcpy(dst, src + t * MR, sizeof(float) * MR);  // a constant size: one move, not a call of memcpy
      } else {
        std::memcpy(dst, src + t * MR, sizeof(float) * m);
        std::memset(dst + m, 0, sizeof(float) * (MR - m));
      }
    }
  }
}

// Panels [p0, p1) of 32 output columns of [dW_ih; db] (with_input) and / or of dW_hh (with_hidden);
// both at once only where they share their dz (dz_x = dz_h: the LSTM and the Elman RNN), as the tiles of
// one A operand [x_k | p_k] against each block of dz. Blocks of rows outermost, so that a block of the A
// operand (kGradRowBlock rows) is read from memory, and packed, once for all the panels; then dz's
// block for a group of up to kGradPanelGroup panels, a row at a time. Measured on the EPYC VM, an
// LSTM's (I=16, H=128, G=512, T B = 12,800 rows) with two threads: 14.8-15.0 ms with a pass per operand
// and a panel of dz at a time, 13.0-13.2 ms after (alone, fastest of 30); the call in a jitted program,
// median of 100: 13.3-14.4 against 11.9-14.5 ms; the character LM's second layer (I=H=256, G=1024)
// 23.2-28.9 against 21.8-23.8 ms; that LSTM's fwd+bwd (B=64 T=200), medians of 60 in four ABBA pairs,
// 47.9-54.8 against 44.5-50.0 ms.
void grad_panels(const GradOperands& o, bool with_input, bool with_hidden, int p0, int p1) {
  const int np = p1 - p0, K = o.T * o.B;
  if (np <= 0) return;
  const int G = with_input ? o.Gx : o.Gh;
  const float* dz = with_input ? o.dzx : o.dzh;
  const int tx = with_input ? (o.I + MR - 1) / MR : 0, th = with_hidden ? (o.H + MR - 1) / MR : 0;
  const int tiles = tx + th, group = std::min(np, kGradPanelGroup);
  const size_t tile = static_cast<size_t>(MR) * NR;  // one tile's accumulators
  float* blocks = scratch(0).get(static_cast<size_t>(kGradRowBlock) * NR * group);
  float* acc = scratch(1).get(static_cast<size_t>(np) * std::max(tiles, 1) * tile);
  float* apack = scratch(2).get(static_cast<size_t>(kGradRowBlock) * std::max(tiles, 1) * MR);
  std::fill(acc, acc + static_cast<size_t>(np) * tiles * tile, 0.0f);
  std::vector<vf> sums(2 * np, splat(0.0f));
  for (int k0 = 0; k0 < K; k0 += kGradRowBlock) {
    const int k1 = std::min(K, k0 + kGradRowBlock), kb = k1 - k0;
    if (tx > 0) pack_grad_rows(o, true, o.I, k0, k1, apack);
    if (th > 0) pack_grad_rows(o, false, o.H, k0, k1, apack + static_cast<size_t>(tx) * kb * MR);
    for (int j0 = 0; j0 < np; j0 += group) {
      const int ng = std::min(group, np - j0);
      pack_grad_blocks(dz, G, k0, k1, p0 + j0, ng, blocks, with_input ? &sums[2 * j0] : nullptr);
      for (int jj = 0; jj < ng; ++jj) {
        float* accj = acc + static_cast<size_t>(j0 + jj) * tiles * tile;
        const float* block = blocks + static_cast<size_t>(jj) * kb * NR;
        for (int t = 0; t < tiles; ++t) {
          grad_tile(apack + static_cast<size_t>(t) * kb * MR, kb, block, NR, accj + t * tile);
        }
      }
    }
  }
  for (int j = 0; j < np; ++j) {
    const int col = (p0 + j) * NR, m = std::min(NR, G - col);
    const float* accj = acc + static_cast<size_t>(j) * tiles * tile;
    for (int r = 0; r < (with_input ? o.I : 0); ++r) {
      std::memcpy(o.dw_ih + static_cast<size_t>(r) * G + col, accj + static_cast<size_t>(r) * NR, sizeof(float) * m);
    }
    for (int r = 0; r < (with_hidden ? o.H : 0); ++r) {
      std::memcpy(o.dw_hh + static_cast<size_t>(r) * G + col, accj + (static_cast<size_t>(tx) * MR + r) * NR,
                  sizeof(float) * m);
    }
    if (with_input) {
      float tmp[NR];
      store(tmp, sums[2 * j]);
      store(tmp + VL, sums[2 * j + 1]);
      std::memcpy(o.db + col, tmp, sizeof(float) * m);
    }
  }
}

// The weight gradients of o after its backward loop, with up to `threads` threads (0: the pool's).
void weight_grads(ffi::ThreadPool& pool, const GradOperands& o, int threads) {
  const int px = static_cast<int>((o.Gx + NR - 1) / NR), ph = static_cast<int>((o.Gh + NR - 1) / NR);
  // One pass for both operands where they share dz (the LSTM and the Elman RNN pass theirs twice).
  const bool shared = o.dzx == o.dzh && o.Gx == o.Gh;
  int n = static_cast<int>(pool.num_threads());
  if (threads > 0) n = std::min(n, static_cast<int>(threads));
  n = std::max(1, std::min(n, std::max(px, ph)));
  const double flops = 2.0 * o.T * o.B * (static_cast<double>(o.I) * o.Gx + static_cast<double>(o.H) * o.Gh);
  if (n < 2 || flops < kMinGradSplitFlops) {
    if (shared) {
      grad_panels(o, true, true, 0, ph);
    } else {
      grad_panels(o, false, true, 0, ph);
      grad_panels(o, true, false, 0, px);
    }
    return;
  }
  // Work items: with a shared dz and at least two panels a thread, n groups of panels through both
  // operands (2 or 4 groups a thread re-read the A operand from memory once a group, and were slower);
  // otherwise the recurrent panels in n groups, then the input panels in n groups. Each thread's
  // share of a block of rows stays in its cache.
  const bool fused = shared && ph >= 2 * n;
  const int items = fused ? n : 2 * n;
  run_row_chunks(pool, n, items, items, 0, /*caller_works=*/true, [&](const Part& part, Barrier&) {
    for (int c = part.b0; c < part.b1; ++c) {
      if (fused) {
        grad_panels(o, true, true, ph * c / n, ph * (c + 1) / n);
        continue;
      }
      const bool input = c >= n;
      const int g = input ? c - n : c, count = input ? px : ph;
      grad_panels(o, input, !input, count * g / n, count * (g + 1) / n);
    }
  });
}

// ---------------------------------------------------------------------------
// Weight gradients inside a backward loop split by batch rows.
// ---------------------------------------------------------------------------
// The backward of a small LSTM or Elman RNN (split by rows: a chunk of rows
// runs its whole loop alone) adds its rows' [x_k | p_k]ᵀ dz_k to the chunk's
// own accumulators a group of steps at a time (kStepGradRows rows deep),
// while their dz is still in cache, where weight_grads after the loop reads
// all of dz again from memory. dz is shared
// by both products, so a group is one pass through the tiles of [x | p]. The
// chunks are fixed by the shapes and the pool's size, not by the call's
// threads, and their sums are added in chunk order: the gradients are the
// same bit for bit on one thread and on the pool's. Measured on the EPYC VM,
// the cpu_small suite's LSTM rows against PyTorch in five alternating runs
// each: B=64 T=500 H=64 2.63-2.95x against 2.44-2.63x, B=64 T=200 H=128
// 1.50-1.86x against 1.45-1.69x; the smallest (B=32, T=50, H=32) within the
// VM's noise. Where a chunk's accumulators ((I + H + 1) x G floats) fit in
// kMaxStepGradBytes (beside the packed recurrent weights, in a 1 MiB L2 cache)
// and G fills whole panels; else weight_grads runs after the loop.
constexpr double kMaxStepGradBytes = 512.0 * 1024;
constexpr int kStepGradRows = 128;
constexpr int kMaxStepGradSteps = 32;

struct StepGrads {
  GradOperands o;  // o.dzx == o.dzh: one dz for both products
  int chunks = 0, tiles = 0, np = 0;
  int steps = 1;         // steps a chunk collects before it adds them (kStepGradRows rows at least)
  size_t per_chunk = 0;  // floats: np panels of tiles x (MR x NR) accumulators, then G bias sums
  float* acc = nullptr;
  int* pending = nullptr;  // per chunk: `steps` first rows k0 of collected steps, then their count

  // Rows [k0, k1) of a step (k = t B + b) into chunk c's sums: collected, and added `steps` at a time
  // (and at the chunk's last step, `last`), K = steps (k1 - k0) rows deep: a step alone (16 rows at
  // B=64) loaded and stored every accumulator for a few rows' products (measured: the sums ran at 55
  // GFLOP/s a core, where the products after the loop reach 80).
  void add(int c, int k0, int k1, bool last) const {
    int* mine = pending + c * (steps + 1);
    mine[mine[steps]++] = k0;
    if (mine[steps] < steps && !last) return;
    const int rows = k1 - k0, count = mine[steps], kb = count * rows;
    mine[steps] = 0;
    const int tx = (o.I + MR - 1) / MR, G = o.Gh;
    float* apack = scratch(6).get(static_cast<size_t>(kb) * tiles * MR);
    for (int q = 0; q < count; ++q) {  // each step's rows, tile-major, `kb` rows a tile
      const int first = mine[q];
      if (o.I > 0) pack_grad_rows(o, true, o.I, first, first + rows, apack + static_cast<size_t>(q) * rows * MR, kb);
      pack_grad_rows(o, false, o.H, first, first + rows, apack + (static_cast<size_t>(tx) * kb + q * rows) * MR, kb);
    }
    // Panel by panel, the collected rows of dz first into a contiguous block (its rows lie G floats apart,
    // and a step's B G apart: read in place, they crowd a few sets of the L1 cache, and every tile read
    // them again from L2), summed for db on the way.
    const size_t tile = static_cast<size_t>(MR) * NR;
    float* sums = acc + c * per_chunk;
    float* db = sums + static_cast<size_t>(np) * tiles * tile;
    float* block = scratch(7).get(static_cast<size_t>(kb) * NR);
    for (int j = 0; j < np; ++j) {
      vf s0 = load(db + j * NR), s1 = load(db + j * NR + VL);
      for (int q = 0; q < count; ++q) {
        const float* src = o.dzh + static_cast<size_t>(mine[q]) * G + j * NR;
        float* dst = block + static_cast<size_t>(q) * rows * NR;
        for (int r = 0; r < rows; ++r) {
          const vf v0 = load(src + static_cast<size_t>(r) * G), v1 = load(src + static_cast<size_t>(r) * G + VL);
          store(dst + r * NR, v0);
          store(dst + r * NR + VL, v1);
          s0 += v0;
          s1 += v1;
        }
      }
      store(db + j * NR, s0);
      store(db + j * NR + VL, s1);
      float* accj = sums + static_cast<size_t>(j) * tiles * tile;
      for (int t = 0; t < tiles; ++t) grad_tile(apack + static_cast<size_t>(t) * kb * MR, kb, block, NR, accj + t * tile);
    }
  }

  // The chunks' sums added in chunk order, into dW_ih, db and dW_hh.
  void finish() const {
    for (int c = 1; c < chunks; ++c) {
      const float* src = acc + c * per_chunk;
      for (size_t q = 0; q < per_chunk; ++q) acc[q] += src[q];
    }
    const int tx = (o.I + MR - 1) / MR, G = o.Gh;
    const size_t tile = static_cast<size_t>(MR) * NR;
    for (int j = 0; j < np; ++j) {
      const float* accj = acc + static_cast<size_t>(j) * tiles * tile;
      for (int r = 0; r < o.I; ++r) std::memcpy(o.dw_ih + static_cast<size_t>(r) * G + j * NR, accj + static_cast<size_t>(r) * NR, sizeof(float) * NR);
      for (int r = 0; r < o.H; ++r) {
        std::memcpy(o.dw_hh + static_cast<size_t>(r) * G + j * NR, accj + (static_cast<size_t>(tx) * MR + r) * NR, sizeof(float) * NR);
      }
    }
    std::memcpy(o.db, acc + static_cast<size_t>(np) * tiles * tile, sizeof(float) * G);
  }
};

// The chunks of rows of a backward that adds its weight gradients step by step
// (StepGrads), or 0 where weight_grads runs after its loop: where the loop
// would be split by rows on this pool (``split`` not forcing units) and the
// accumulators fit. K x cols are the loop's packed weights (as run_split counts them).
bool step_grads_fit(const Dims& d, int K, int gates, int I, int G, int32_t split) {
  return split != kSplitUnits && d.B / kMinChunkRows >= 2 && G % NR == 0 && d.T > 0 &&
         4.0 * K * gates * d.H <= kMaxRowSplitWeightBytes && 4.0 * (I + d.H + 1) * G <= kMaxStepGradBytes;
}

int step_grad_chunks(const Dims& d, int K, int gates, int I, int G, int32_t split, ffi::ThreadPool& pool) {
  if (!step_grads_fit(d, K, gates, I, G, split)) return 0;
  const int n = std::max(1, static_cast<int>(pool.num_threads()));
  return std::min(d.B / kMinChunkRows, std::max(2, n * kChunksPerThread));
}

// Runs a backward loop job whose chunks add their weight gradients (sg.chunks
// fixed chunks of rows, up to `threads` threads), then sums them.
void run_step_grads(ffi::ThreadPool& pool, const Dims& d, int K, int gates, int threads, StepGrads& sg,
                    std::vector<float>& storage, const PartJob& job) {
  const size_t tile = static_cast<size_t>(MR) * NR;
  sg.tiles = (sg.o.I + MR - 1) / MR + (sg.o.H + MR - 1) / MR;
  sg.np = sg.o.Gh / NR;
  sg.per_chunk = static_cast<size_t>(sg.np) * sg.tiles * tile + sg.o.Gh;
  storage.assign(sg.per_chunk * sg.chunks, 0.0f);
  sg.acc = storage.data();
  const int rows = d.B / sg.chunks;  // the smallest chunk's
  sg.steps = std::min({d.T, kMaxStepGradSteps, std::max(1, (kStepGradRows + rows - 1) / rows)});
  std::vector<int> pending(static_cast<size_t>(sg.chunks) * (sg.steps + 1), 0);
  sg.pending = pending.data();
  int n = static_cast<int>(pool.num_threads());
  if (threads > 0) n = std::min(n, threads);
  const double flops = 2.0 * d.T * d.B * K * gates * d.H;
  const int members = flops >= kMinRowSplitFlops ? std::max(1, std::min(n, sg.chunks)) : 1;
  if (members <= 1) {
    Barrier alone(1);
    for (int c = 0; c < sg.chunks; ++c) {
      job(Part{0, d.H, static_cast<int>(static_cast<int64_t>(d.B) * c / sg.chunks),
               static_cast<int>(static_cast<int64_t>(d.B) * (c + 1) / sg.chunks), c},
          alone);
    }
  } else {
    run_row_chunks(pool, members, sg.chunks, d.B, d.H, /*caller_works=*/true, job);
  }
  sg.finish();
}

// ---------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------
// One row's LSTM update over nu units: z_k = g[k gs + u] + bias[k H + u] for the
// gates k = i f g o (g and bias point at the first unit); c (nu units) is updated
// in place and h written; with act (the row of a at the first unit, gate stride
// H) and cs, the activations and the new cell state are saved too.
inline void lstm_units(const float* g, int gs, const float* bias, int H, int nu, float* c, float* h, float* act,
                       float* cs) {
  for (int u = 0; u < nu; u += VL) {
    const int m = std::min(VL, nu - u);
    const vf zi = load_n(g + u, m) + load_n(bias + u, m);
    const vf zf = load_n(g + gs + u, m) + load_n(bias + H + u, m);
    const vf zg = load_n(g + 2 * gs + u, m) + load_n(bias + 2 * H + u, m);
    const vf zo = load_n(g + 3 * gs + u, m) + load_n(bias + 3 * H + u, m);
    const vf i = vsigmoid(zi), f = vsigmoid(zf), gg = vtanh(zg), o = vsigmoid(zo);
    const vf cn = f * load_n(c + u, m) + i * gg;
    store_n(c + u, cn, m);
    store_n(h + u, o * vtanh(cn), m);
    if (act != nullptr) {
      store_n(cs + u, cn, m);
      store_n(act + u, i, m);
      store_n(act + H + u, f, m);
      store_n(act + 2 * H + u, gg, m);
      store_n(act + 3 * H + u, o, m);
    }
  }
}

// Where a saving forward computes its input projection (the ``projection``
// attribute of jaxrnn_lstm_fwd).
enum Projection : int32_t { kProjectionAuto = 0, kProjectionInLoop = 1, kProjectionHoisted = 2 };

// A saving forward whose member holds every unit (split by rows, or alone) may
// project every step's input before its loop, into the activations' rows,
// which each step then completes with h_{t-1} w_hh (C += in the micro-kernel:
// the same additions in the same order, so the results are bit-identical) and
// overwrites with the gates: the projection runs with w_ih resident in the
// core's L2 cache, and the loop with w_hh alone, instead of streaming both
// from beyond L2 every step. kProjectionAuto does so when the packed
// [w_ih; w_hh] exceed kHoistMinWeightBytes while w_hh fits kHoistMaxRecurrentBytes.
// Measured on 2 cores (Ice Lake, L2 1.25 MiB per core), fwd+bwd medians of 30
// interleaved calls, in-loop against hoisted: B=32 T=128 I=256 H=256 (the
// character LM's second layer, 2 MiB) 76.5 against 70.4 ms, B=32 T=256 I=128
// H=256 (1.5 MiB) 111.8 against 109.3 ms, and the LM's whole training step
// 134.3 against 126.7 ms; below 1 MiB hoisting was slower (B=16 T=64 I=256
// H=128: 7.35 against 7.80 ms; B=64 T=200 I=64 H=64: 18.0 against 19.1 ms).
constexpr double kHoistMinWeightBytes = 1.0 * 1024 * 1024;
constexpr double kHoistMaxRecurrentBytes = 1.0 * 1024 * 1024;
inline bool hoists_projection(int32_t projection, int I, int H, int gates) {
  const double cols = static_cast<double>(gates) * H;
  if (I == 0 || (gates * H) % NR != 0 || projection == kProjectionInLoop) return false;
  if (projection == kProjectionHoisted) return true;
  return 4.0 * (I + H) * cols > kHoistMinWeightBytes && 4.0 * H * cols <= kHoistMaxRecurrentBytes;
}

void lstm_forward_member(const Part& part, Barrier& barrier, const Dims& d, bool reverse, const float* xs,
                         const float* w_ih, const float* bias, const float* w, const float* h0, const float* c0,
                         const int32_t* lengths, const int32_t* ids, float* act_out, float* hs, float* cs, float* hT,
                         float* cT, int32_t projection) {
  const int T = d.T, B = d.B, H = d.H, I = d.I, G = 4 * H;
  const bool save = act_out != nullptr;
  const int u0 = part.u0, nu = part.u1 - part.u0;
  // Every step's input projection first, into the activations' rows (see hoists_projection).
  const bool hoist = save && ids == nullptr && nu == H && hoists_projection(projection, I, H, 4);
  // This member's columns of [w_ih; w_hh] ((I + H) x 4H; gate-major: [i f g o] over its units), or of
  // w_hh alone after the hoisted projection.
  int npanels;
  const float* packed = hoist ? pack_columns(scratch(0), nullptr, 0, w, H, G, 0, 4, H, 0, H, &npanels)
                              : pack_columns(scratch(0), w_ih, I, w, H, G, 0, 4, H, u0, nu, &npanels);
  const int ldg = npanels * NR;
  if (hoist) {
    int np_x;
    const float* packed_x = pack_columns(scratch(3), w_ih, I, nullptr, 0, G, 0, 4, H, 0, H, &np_x);
    for (int t = 0; t < T; ++t) {
      gemm_part(part, xs + static_cast<size_t>(t) * B * I, I, I, nullptr, 0, 0, packed_x, np_x,
                act_out + static_cast<size_t>(t) * B * G, G);
    }
  }
  float* gates = hoist ? nullptr : scratch(1).get(static_cast<size_t>(B) * ldg + NR);
  float* c = scratch(2).get(static_cast<size_t>(B) * nu + VL);
  for (int b = part.b0; b < part.b1; ++b) std::memcpy(c + b * nu, c0 + static_cast<size_t>(b) * H + u0, sizeof(float) * nu);
  int sense = 0;
  for (int s = 0; s < T; ++s) {
    const int t = reverse ? T - 1 - s : s;
    const int tp = reverse ? t + 1 : t - 1;  // the step before, in walking order
    const float* h_prev = s == 0 ? h0 : hs + static_cast<size_t>(tp) * B * H;
    const float* x_t = xs + static_cast<size_t>(t) * B * I;
    if (hoist) {  // z_t = (x_t w_ih) + h_{t-1} w_hh, summed in the order of the single product below
      gemm_part<true>(part, h_prev, H, H, nullptr, 0, 0, packed, npanels, act_out + static_cast<size_t>(t) * B * G, G);
    } else if (nu > 0) {
      gemm_part(part, x_t, I, I, h_prev, H, H, packed, npanels, gates, ldg);
    }
    for (int b = part.b0; b < part.b1 && nu > 0; ++b) {
      const bool valid = t < lengths[b];
      const size_t row = (static_cast<size_t>(t) * B + b);
      float* act = save ? act_out + row * G : nullptr;
      float* hrow = hs + row * H + u0;
      float* crow = c + b * nu;
      // lstm_units reads each unit's four pre-activations before it writes its activations over them.
      const float* g = hoist ? act : gates + static_cast<size_t>(b) * ldg;
      if (!valid) {  // hold the carry
        std::memcpy(hrow, h_prev + static_cast<size_t>(b) * H + u0, sizeof(float) * nu);
        if (save) std::memcpy(cs + row * H + u0, crow, sizeof(float) * nu);
        continue;
      }
      // With ids, the bias is a table: row ids[t, b] holds this input's projection (plus bias).
      const float* brow = ids != nullptr ? bias + static_cast<size_t>(ids[row]) * G : bias;
      lstm_units(g, nu, brow + u0, H, nu, crow, hrow, save ? act + u0 : nullptr, save ? cs + row * H + u0 : nullptr);
    }
    barrier.wait(sense);
  }
  const int tl = reverse ? 0 : T - 1;
  for (int b = part.b0; b < part.b1; ++b) {
    std::memcpy(hT + static_cast<size_t>(b) * H + u0, T > 0 ? hs + (static_cast<size_t>(tl) * B + b) * H + u0 : h0 + static_cast<size_t>(b) * H + u0, sizeof(float) * nu);
    std::memcpy(cT + static_cast<size_t>(b) * H + u0, c + b * nu, sizeof(float) * nu);
  }
}

// ---------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------
void lstm_backward_member(const Part& part, Barrier& barrier, const Dims& d, bool reverse, float* act_dz,
                          const float* cs, const float* c0, const float* dhs, const float* dhT, const float* dcT,
                          const float* w, const int32_t* lengths, float* dh0, float* dc0, const StepGrads* sg) {
  const int T = d.T, B = d.B, H = d.H, G = 4 * H;
  const int u0 = part.u0, nu = part.u1 - part.u0;
  int npanels;
  const float* packed = pack_rows_transposed(scratch(0), w, G, 0, G, u0, nu, &npanels);
  const int ldd = npanels * NR;
  float* dprod = scratch(1).get(static_cast<size_t>(B) * ldd + NR);
  float* dh = scratch(2).get(static_cast<size_t>(B) * nu + VL);
  float* dc = scratch(3).get(static_cast<size_t>(B) * nu + VL);
  for (int b = part.b0; b < part.b1; ++b) {
    std::memcpy(dh + b * nu, dhT + static_cast<size_t>(b) * H + u0, sizeof(float) * nu);
    std::memcpy(dc + b * nu, dcT + static_cast<size_t>(b) * H + u0, sizeof(float) * nu);
  }
  int sense = 0;
  for (int s = 0; s < T; ++s) {
    const int t = reverse ? s : T - 1 - s;  // the forward's order, backwards
    const bool first = reverse ? t == T - 1 : t == 0;
    const int tp = reverse ? t + 1 : t - 1;
    for (int b = part.b0; b < part.b1 && nu > 0; ++b) {
      const size_t row = static_cast<size_t>(t) * B + b;
      float* a = act_dz + row * G;
      if (t >= lengths[b]) {  // padding: no gate gradient; the carry's passes through
        for (int q = 0; q < 4; ++q) std::memset(a + q * H + u0, 0, sizeof(float) * nu);
        continue;
      }
      const float* cprev = first ? c0 + static_cast<size_t>(b) * H + u0 : cs + (static_cast<size_t>(tp) * B + b) * H + u0;
      const float* ct = cs + row * H + u0;
      const float* dht = dhs + row * H + u0;
      float* dhb = dh + b * nu;
      float* dcb = dc + b * nu;
      for (int u = 0; u < nu; u += VL) {
        const int m = std::min(VL, nu - u);
        const int gu = u0 + u;
        const vf i = load_n(a + gu, m), f = load_n(a + H + gu, m), g = load_n(a + 2 * H + gu, m),
                 o = load_n(a + 3 * H + gu, m);
        const vf tc = vtanh(load_n(ct + u, m));
        const vf dhv = load_n(dhb + u, m) + load_n(dht + u, m);
        const vf dcv = load_n(dcb + u, m) + dhv * o * dtanh(tc);
        store_n(a + gu, dcv * g * i * (1.0f - i), m);
        store_n(a + H + gu, dcv * load_n(cprev + u, m) * f * (1.0f - f), m);
        store_n(a + 2 * H + gu, dcv * i * dtanh(g), m);
        store_n(a + 3 * H + gu, dhv * tc * o * (1.0f - o), m);
        store_n(dcb + u, dcv * f, m);
      }
    }
    barrier.wait(sense);  // all of dz_t is written
    if (nu > 0) gemm_part(part, act_dz + static_cast<size_t>(t) * B * G, G, G, nullptr, 0, 0, packed, npanels, dprod, ldd);
    for (int b = part.b0; b < part.b1 && nu > 0; ++b) {
      if (t >= lengths[b]) continue;  // dh passes through unchanged
      std::memcpy(dh + b * nu, dprod + static_cast<size_t>(b) * ldd, sizeof(float) * nu);
    }
    if (sg != nullptr) sg->add(part.chunk, t * B + part.b0, t * B + part.b1, s == T - 1);
  }
  for (int b = part.b0; b < part.b1; ++b) {
    std::memcpy(dh0 + static_cast<size_t>(b) * H + u0, dh + b * nu, sizeof(float) * nu);
    std::memcpy(dc0 + static_cast<size_t>(b) * H + u0, dc + b * nu, sizeof(float) * nu);
  }
}

// A member's three GRU products per step, packed, with their outputs:
// [x | h] [w_ir w_iu; w_hr w_hu] (g_ru), x w_in (g_x) and h w_hn (g_h), kept
// apart because r scales the last (after the matmul, or before it: then the
// product reads r ⊙ h). Scratch slots 0-5.
struct GruProducts {
  int np_ru, np_x, np_h, ld_ru, ld_x, ld_h;
  const float *p_ru, *p_x, *p_h;
  float *g_ru, *g_x, *g_h;
  GruProducts(const float* w_ih, const float* w, int I, int H, int B, int u0, int nu) {
    const int G = 3 * H;
    p_ru = pack_columns(scratch(0), w_ih, I, w, H, G, 0, 2, H, u0, nu, &np_ru);
    p_x = pack_columns(scratch(1), w_ih, I, nullptr, 0, G, 2 * H, 1, H, u0, nu, &np_x);
    p_h = pack_columns(scratch(2), nullptr, 0, w, H, G, 2 * H, 1, H, u0, nu, &np_h);
    ld_ru = np_ru * NR;
    ld_x = np_x * NR;
    ld_h = np_h * NR;
    g_ru = scratch(3).get(static_cast<size_t>(B) * ld_ru + NR);
    g_x = scratch(4).get(static_cast<size_t>(B) * ld_x + NR);
    g_h = scratch(5).get(static_cast<size_t>(B) * ld_h + NR);
  }
};

// ---------------------------------------------------------------------------
// GRU, reset after the matmul.
// ---------------------------------------------------------------------------
void gru_forward_member(const Part& part, Barrier& barrier, const Dims& d, bool reverse, const float* xs,
                        const float* w_ih, const float* bias, const float* w, const float* b_hn, const float* h0,
                        const int32_t* lengths, float* act_out, float* m_out, float* hs, float* hT) {
  const int T = d.T, B = d.B, H = d.H, I = d.I, G = 3 * H;
  const bool save = act_out != nullptr;
  const int u0 = part.u0, nu = part.u1 - part.u0;
  const GruProducts p(w_ih, w, I, H, B, u0, nu);
  int sense = 0;
  for (int s = 0; s < T; ++s) {
    const int t = reverse ? T - 1 - s : s;
    const int tp = reverse ? t + 1 : t - 1;
    const float* h_prev = s == 0 ? h0 : hs + static_cast<size_t>(tp) * B * H;
    const float* x_t = xs + static_cast<size_t>(t) * B * I;
    if (nu > 0) {
      gemm_part(part, x_t, I, I, h_prev, H, H, p.p_ru, p.np_ru, p.g_ru, p.ld_ru);
      gemm_part(part, x_t, I, I, nullptr, 0, 0, p.p_x, p.np_x, p.g_x, p.ld_x);
      gemm_part(part, h_prev, H, H, nullptr, 0, 0, p.p_h, p.np_h, p.g_h, p.ld_h);
    }
    for (int b = part.b0; b < part.b1 && nu > 0; ++b) {
      const size_t row = static_cast<size_t>(t) * B + b;
      const float* hp = h_prev + static_cast<size_t>(b) * H + u0;
      float* hrow = hs + row * H + u0;
      if (t >= lengths[b]) {  // hold the carry
        std::memcpy(hrow, hp, sizeof(float) * nu);
        continue;
      }
      const float* gru = p.g_ru + static_cast<size_t>(b) * p.ld_ru;
      const float* gx = p.g_x + static_cast<size_t>(b) * p.ld_x;
      const float* gh = p.g_h + static_cast<size_t>(b) * p.ld_h;
      for (int u = 0; u < nu; u += VL) {
        const int mm = std::min(VL, nu - u);
        const int gu = u0 + u;
        const vf r = vsigmoid(load_n(gru + u, mm) + load_n(bias + gu, mm));
        const vf uu = vsigmoid(load_n(gru + nu + u, mm) + load_n(bias + H + gu, mm));
        const vf m = load_n(gh + u, mm) + load_n(b_hn + gu, mm);
        const vf nn = vtanh(load_n(gx + u, mm) + load_n(bias + 2 * H + gu, mm) + r * m);
        const vf h = load_n(hp + u, mm);
        store_n(hrow + u, h + uu * (nn - h), mm);
        if (save) {
          float* act = act_out + row * G;
          store_n(act + gu, r, mm);
          store_n(act + H + gu, uu, mm);
          store_n(act + 2 * H + gu, nn, mm);
          store_n(m_out + row * H + gu, m, mm);
        }
      }
    }
    barrier.wait(sense);
  }
  const int tl = reverse ? 0 : T - 1;
  for (int b = part.b0; b < part.b1; ++b) {
    const float* src = T > 0 ? hs + (static_cast<size_t>(tl) * B + b) * H : h0 + static_cast<size_t>(b) * H;
    std::memcpy(hT + static_cast<size_t>(b) * H + u0, src + u0, sizeof(float) * nu);
  }
}

// h_t = h + u (n - h), n = tanh(z_n), z_n = x w_in + b_n + r m, m = h w_hn + b_hn:
//   dn = dh u;  du = dh (n - h);  dz_n = dn (1 - n²);  dz_r = dz_n m r (1 - r);  dz_u = du u (1 - u);
//   dm = dz_n r;  dh_{t-1} = dh (1 - u) + [dz_r dz_u dm] w_hhᵀ.
void gru_backward_member(const Part& part, Barrier& barrier, const Dims& d, bool reverse, float* act_dzx,
                         const float* ms, const float* hs, const float* h0, const float* dhs, const float* dhT,
                         const float* w, const int32_t* lengths, float* dzh, float* dh0) {
  const int T = d.T, B = d.B, H = d.H, G = 3 * H;
  const int u0 = part.u0, nu = part.u1 - part.u0;
  int npanels;
  const float* packed = pack_rows_transposed(scratch(0), w, G, 0, G, u0, nu, &npanels);
  const int ldd = npanels * NR;
  float* dprod = scratch(1).get(static_cast<size_t>(B) * ldd + NR);
  float* dh = scratch(2).get(static_cast<size_t>(B) * nu + VL);
  float* keep = scratch(3).get(static_cast<size_t>(B) * nu + VL);  // dh (1 - u): the direct path to h_{t-1}
  for (int b = part.b0; b < part.b1; ++b) std::memcpy(dh + b * nu, dhT + static_cast<size_t>(b) * H + u0, sizeof(float) * nu);
  int sense = 0;
  for (int s = 0; s < T; ++s) {
    const int t = reverse ? s : T - 1 - s;
    const bool first = reverse ? t == T - 1 : t == 0;
    const int tp = reverse ? t + 1 : t - 1;
    for (int b = part.b0; b < part.b1 && nu > 0; ++b) {
      const size_t row = static_cast<size_t>(t) * B + b;
      float* a = act_dzx + row * G;
      float* zh = dzh + row * G;
      if (t >= lengths[b]) {  // padding: no gate gradient; the carry's passes through
        for (int q = 0; q < 3; ++q) {
          std::memset(a + q * H + u0, 0, sizeof(float) * nu);
          std::memset(zh + q * H + u0, 0, sizeof(float) * nu);
        }
        continue;
      }
      const float* hp = first ? h0 + static_cast<size_t>(b) * H + u0 : hs + (static_cast<size_t>(tp) * B + b) * H + u0;
      const float* mrow = ms + row * H + u0;
      const float* dht = dhs + row * H + u0;
      float* dhb = dh + b * nu;
      float* kb = keep + b * nu;
      for (int u = 0; u < nu; u += VL) {
        const int mm = std::min(VL, nu - u);
        const int gu = u0 + u;
        const vf r = load_n(a + gu, mm), uu = load_n(a + H + gu, mm), nn = load_n(a + 2 * H + gu, mm);
        const vf dhv = load_n(dhb + u, mm) + load_n(dht + u, mm);
        const vf dzn = dhv * uu * dtanh(nn);
        const vf dzr = dzn * load_n(mrow + u, mm) * r * (1.0f - r);
        const vf dzu = dhv * (nn - load_n(hp + u, mm)) * uu * (1.0f - uu);
        store_n(a + gu, dzr, mm);
        store_n(a + H + gu, dzu, mm);
        store_n(a + 2 * H + gu, dzn, mm);
        store_n(zh + gu, dzr, mm);
        store_n(zh + H + gu, dzu, mm);
        store_n(zh + 2 * H + gu, dzn * r, mm);
        store_n(kb + u, dhv * (1.0f - uu), mm);
      }
    }
    barrier.wait(sense);  // all of dz_h at t is written
    if (nu > 0) gemm_part(part, dzh + static_cast<size_t>(t) * B * G, G, G, nullptr, 0, 0, packed, npanels, dprod, ldd);
    for (int b = part.b0; b < part.b1 && nu > 0; ++b) {
      if (t >= lengths[b]) continue;  // dh passes through unchanged
      const float* pr = dprod + static_cast<size_t>(b) * ldd;
      float* dhb = dh + b * nu;
      const float* kb = keep + b * nu;
      for (int u = 0; u < nu; u += VL) {
        const int mm = std::min(VL, nu - u);
        store_n(dhb + u, load_n(pr + u, mm) + load_n(kb + u, mm), mm);
      }
    }
  }
  for (int b = part.b0; b < part.b1; ++b) std::memcpy(dh0 + static_cast<size_t>(b) * H + u0, dh + b * nu, sizeof(float) * nu);
}

// ---------------------------------------------------------------------------
// GRU, reset before the matmul (the lectures' form): the candidate's product
// reads q = r ⊙ h_{t-1} of every unit, so a step has two barriers.
//   r, u = sigmoid(x w_i{r,u} + h w_h{r,u} + b_{r,u});  q = r h;
//   n = tanh(x w_in + b_n + q w_hn);  h_t = h + u (n - h)
// ---------------------------------------------------------------------------
void gru_before_forward_member(const Part& part, Barrier& barrier, const Dims& d, bool reverse, const float* xs,
                               const float* w_ih, const float* bias, const float* w, const float* h0,
                               const int32_t* lengths, float* act_out, float* q_all, bool save, float* hs,
                               float* hT) {
  const int T = d.T, B = d.B, H = d.H, I = d.I, G = 3 * H;
  const int u0 = part.u0, nu = part.u1 - part.u0;
  const GruProducts p(w_ih, w, I, H, B, u0, nu);
  float* uu_keep = scratch(6).get(static_cast<size_t>(B) * nu + VL);
  int sense = 0;
  for (int s = 0; s < T; ++s) {
    const int t = reverse ? T - 1 - s : s;
    const int tp = reverse ? t + 1 : t - 1;
    const float* h_prev = s == 0 ? h0 : hs + static_cast<size_t>(tp) * B * H;
    const float* x_t = xs + static_cast<size_t>(t) * B * I;
    float* q = save ? q_all + static_cast<size_t>(t) * B * H : q_all;  // (B, H): this step's r ⊙ h_{t-1}
    if (nu > 0) {
      gemm_part(part, x_t, I, I, h_prev, H, H, p.p_ru, p.np_ru, p.g_ru, p.ld_ru);
      gemm_part(part, x_t, I, I, nullptr, 0, 0, p.p_x, p.np_x, p.g_x, p.ld_x);
    }
    for (int b = part.b0; b < part.b1 && nu > 0; ++b) {
      const size_t row = static_cast<size_t>(t) * B + b;
      float* qrow = q + static_cast<size_t>(b) * H + u0;
      if (t >= lengths[b]) {
        std::memset(qrow, 0, sizeof(float) * nu);
        continue;
      }
      const float* hp = h_prev + static_cast<size_t>(b) * H + u0;
      const float* gru = p.g_ru + static_cast<size_t>(b) * p.ld_ru;
      for (int u = 0; u < nu; u += VL) {
        const int mm = std::min(VL, nu - u);
        const int gu = u0 + u;
        const vf r = vsigmoid(load_n(gru + u, mm) + load_n(bias + gu, mm));
        const vf uu = vsigmoid(load_n(gru + nu + u, mm) + load_n(bias + H + gu, mm));
        store_n(qrow + u, r * load_n(hp + u, mm), mm);
        store_n(uu_keep + b * nu + u, uu, mm);
        if (save) {
          store_n(act_out + row * G + gu, r, mm);
          store_n(act_out + row * G + H + gu, uu, mm);
        }
      }
    }
    barrier.wait(sense);  // all of q_t is written
    if (nu > 0) gemm_part(part, q, H, H, nullptr, 0, 0, p.p_h, p.np_h, p.g_h, p.ld_h);
    for (int b = part.b0; b < part.b1 && nu > 0; ++b) {
      const size_t row = static_cast<size_t>(t) * B + b;
      const float* hp = h_prev + static_cast<size_t>(b) * H + u0;
      float* hrow = hs + row * H + u0;
      if (t >= lengths[b]) {  // hold the carry
        std::memcpy(hrow, hp, sizeof(float) * nu);
        continue;
      }
      const float* gx = p.g_x + static_cast<size_t>(b) * p.ld_x;
      const float* gh = p.g_h + static_cast<size_t>(b) * p.ld_h;
      for (int u = 0; u < nu; u += VL) {
        const int mm = std::min(VL, nu - u);
        const int gu = u0 + u;
        const vf nn = vtanh(load_n(gx + u, mm) + load_n(bias + 2 * H + gu, mm) + load_n(gh + u, mm));
        const vf uu = load_n(uu_keep + b * nu + u, mm);
        const vf h = load_n(hp + u, mm);
        store_n(hrow + u, h + uu * (nn - h), mm);
        if (save) store_n(act_out + row * G + 2 * H + gu, nn, mm);
      }
    }
    barrier.wait(sense);  // all of h_t is written (and q may be overwritten)
  }
  const int tl = reverse ? 0 : T - 1;
  for (int b = part.b0; b < part.b1; ++b) {
    const float* src = T > 0 ? hs + (static_cast<size_t>(tl) * B + b) * H : h0 + static_cast<size_t>(b) * H;
    std::memcpy(hT + static_cast<size_t>(b) * H + u0, src + u0, sizeof(float) * nu);
  }
}

//   dn = dh u;  du = dh (n - h);  dz_n = dn (1 - n²);  dz_u = du u (1 - u);
//   dq = dz_n w_hnᵀ (every unit's dz_n: first barrier);  dz_r = dq h r (1 - r);
//   dh_{t-1} = dh (1 - u) + dq r + [dz_r dz_u] w_h{r,u}ᵀ (every unit's dz_r: second barrier).
void gru_before_backward_member(const Part& part, Barrier& barrier, const Dims& d, bool reverse, float* act_dz,
                                const float* hs, const float* h0, const float* dhs, const float* dhT,
                                const float* w, const int32_t* lengths, float* dh0) {
  const int T = d.T, B = d.B, H = d.H, G = 3 * H;
  const int u0 = part.u0, nu = part.u1 - part.u0;
  int np_n, np_ru;
  const float* p_n = pack_rows_transposed(scratch(0), w, G, 2 * H, H, u0, nu, &np_n);      // w_hn[units, :]ᵀ
  const float* p_ru = pack_rows_transposed(scratch(1), w, G, 0, 2 * H, u0, nu, &np_ru);    // w_h{r,u}[units, :]ᵀ
  const int ld_n = np_n * NR, ld_ru = np_ru * NR;
  float* dq = scratch(2).get(static_cast<size_t>(B) * ld_n + NR);
  float* dprod = scratch(3).get(static_cast<size_t>(B) * ld_ru + NR);
  float* dh = scratch(4).get(static_cast<size_t>(B) * nu + VL);
  float* keep = scratch(5).get(static_cast<size_t>(B) * nu + VL);
  for (int b = part.b0; b < part.b1; ++b) std::memcpy(dh + b * nu, dhT + static_cast<size_t>(b) * H + u0, sizeof(float) * nu);
  int sense = 0;
  for (int s = 0; s < T; ++s) {
    const int t = reverse ? s : T - 1 - s;
    const bool first = reverse ? t == T - 1 : t == 0;
    const int tp = reverse ? t + 1 : t - 1;
    float* a_t = act_dz + static_cast<size_t>(t) * B * G;
    // Phase 1: dz_u, dz_n, and dh (1 - u); r stays in place for phase 2.
    for (int b = part.b0; b < part.b1 && nu > 0; ++b) {
      const size_t row = static_cast<size_t>(t) * B + b;
      float* a = a_t + static_cast<size_t>(b) * G;
      if (t >= lengths[b]) {
        for (int q = 0; q < 3; ++q) std::memset(a + q * H + u0, 0, sizeof(float) * nu);
        continue;
      }
      const float* hp = first ? h0 + static_cast<size_t>(b) * H + u0 : hs + (static_cast<size_t>(tp) * B + b) * H + u0;
      const float* dht = dhs + row * H + u0;
      for (int u = 0; u < nu; u += VL) {
        const int mm = std::min(VL, nu - u);
        const int gu = u0 + u;
        const vf uu = load_n(a + H + gu, mm), nn = load_n(a + 2 * H + gu, mm);
        const vf dhv = load_n(dh + b * nu + u, mm) + load_n(dht + u, mm);
        store_n(a + H + gu, dhv * (nn - load_n(hp + u, mm)) * uu * (1.0f - uu), mm);
        store_n(a + 2 * H + gu, dhv * uu * dtanh(nn), mm);
        store_n(keep + b * nu + u, dhv * (1.0f - uu), mm);
      }
    }
    barrier.wait(sense);  // every unit's dz_n at t is written
    if (nu > 0) gemm_part(part, a_t + 2 * H, G, H, nullptr, 0, 0, p_n, np_n, dq, ld_n);
    for (int b = part.b0; b < part.b1 && nu > 0; ++b) {
      if (t >= lengths[b]) continue;
      float* a = a_t + static_cast<size_t>(b) * G;
      const float* hp = first ? h0 + static_cast<size_t>(b) * H + u0 : hs + (static_cast<size_t>(tp) * B + b) * H + u0;
      const float* dqb = dq + static_cast<size_t>(b) * ld_n;
      for (int u = 0; u < nu; u += VL) {
        const int mm = std::min(VL, nu - u);
        const int gu = u0 + u;
        const vf r = load_n(a + gu, mm), dqv = load_n(dqb + u, mm);
        store_n(a + gu, dqv * load_n(hp + u, mm) * r * (1.0f - r), mm);
        store_n(keep + b * nu + u, load_n(keep + b * nu + u, mm) + dqv * r, mm);
      }
    }
    barrier.wait(sense);  // every unit's dz_r at t is written
    if (nu > 0) gemm_part(part, a_t, G, 2 * H, nullptr, 0, 0, p_ru, np_ru, dprod, ld_ru);
    for (int b = part.b0; b < part.b1 && nu > 0; ++b) {
      if (t >= lengths[b]) continue;  // dh passes through unchanged
      const float* pr = dprod + static_cast<size_t>(b) * ld_ru;
      for (int u = 0; u < nu; u += VL) {
        const int mm = std::min(VL, nu - u);
        store_n(dh + b * nu + u, load_n(pr + u, mm) + load_n(keep + b * nu + u, mm), mm);
      }
    }
  }
  for (int b = part.b0; b < part.b1; ++b) std::memcpy(dh0 + static_cast<size_t>(b) * H + u0, dh + b * nu, sizeof(float) * nu);
}

// ---------------------------------------------------------------------------
// Elman RNN: h_t = act(z_t). The backward needs only the outputs: act'(z) in terms of h.
// ---------------------------------------------------------------------------
enum Activation : int32_t { kTanh = 0, kRelu = 1, kLinear = 2 };

inline vf activate(int32_t kind, vf z) {
  if (kind == kTanh) return vtanh(z);
  if (kind == kRelu) return vclamp(z, splat(0.0f), splat(INFINITY));
  return z;
}
inline vf activation_deriv(int32_t kind, vf h) {
  if (kind == kTanh) return dtanh(h);
  if (kind == kRelu) return h > 0 ? splat(1.0f) : splat(0.0f);
  return splat(1.0f);
}

void elman_forward_member(const Part& part, Barrier& barrier, const Dims& d, bool reverse, int32_t kind,
                          const float* xs, const float* w_ih, const float* bias, const float* w, const float* h0,
                          const int32_t* lengths, float* hs, float* hT) {
  const int T = d.T, B = d.B, H = d.H, I = d.I;
  const int u0 = part.u0, nu = part.u1 - part.u0;
  int npanels;
  const float* packed = pack_columns(scratch(0), w_ih, I, w, H, H, 0, 1, H, u0, nu, &npanels);
  const int ldg = npanels * NR;
  float* gates = scratch(1).get(static_cast<size_t>(B) * ldg + NR);
  int sense = 0;
  for (int s = 0; s < T; ++s) {
    const int t = reverse ? T - 1 - s : s;
    const int tp = reverse ? t + 1 : t - 1;
    const float* h_prev = s == 0 ? h0 : hs + static_cast<size_t>(tp) * B * H;
    const float* x_t = xs + static_cast<size_t>(t) * B * I;
    if (nu > 0) gemm_part(part, x_t, I, I, h_prev, H, H, packed, npanels, gates, ldg);
    for (int b = part.b0; b < part.b1 && nu > 0; ++b) {
      const size_t row = static_cast<size_t>(t) * B + b;
      float* hrow = hs + row * H + u0;
      if (t >= lengths[b]) {
        std::memcpy(hrow, h_prev + static_cast<size_t>(b) * H + u0, sizeof(float) * nu);
        continue;
      }
      const float* g = gates + static_cast<size_t>(b) * ldg;
      for (int u = 0; u < nu; u += VL) {
        const int mm = std::min(VL, nu - u);
        store_n(hrow + u, activate(kind, load_n(g + u, mm) + load_n(bias + u0 + u, mm)), mm);
      }
    }
    barrier.wait(sense);
  }
  const int tl = reverse ? 0 : T - 1;
  for (int b = part.b0; b < part.b1; ++b) {
    const float* src = T > 0 ? hs + (static_cast<size_t>(tl) * B + b) * H : h0 + static_cast<size_t>(b) * H;
    std::memcpy(hT + static_cast<size_t>(b) * H + u0, src + u0, sizeof(float) * nu);
  }
}

void elman_backward_member(const Part& part, Barrier& barrier, const Dims& d, bool reverse, int32_t kind,
                           const float* hs, const float* dhs, const float* dhT, const float* w,
                           const int32_t* lengths, float* dz, float* dh0, const StepGrads* sg) {
  const int T = d.T, B = d.B, H = d.H;
  const int u0 = part.u0, nu = part.u1 - part.u0;
  int npanels;
  const float* packed = pack_rows_transposed(scratch(0), w, H, 0, H, u0, nu, &npanels);
  const int ldd = npanels * NR;
  float* dprod = scratch(1).get(static_cast<size_t>(B) * ldd + NR);
  float* dh = scratch(2).get(static_cast<size_t>(B) * nu + VL);
  for (int b = part.b0; b < part.b1; ++b) std::memcpy(dh + b * nu, dhT + static_cast<size_t>(b) * H + u0, sizeof(float) * nu);
  int sense = 0;
  for (int s = 0; s < T; ++s) {
    const int t = reverse ? s : T - 1 - s;
    for (int b = part.b0; b < part.b1 && nu > 0; ++b) {
      const size_t row = static_cast<size_t>(t) * B + b;
      float* z = dz + row * H + u0;
      if (t >= lengths[b]) {
        std::memset(z, 0, sizeof(float) * nu);
        continue;
      }
      const float* h = hs + row * H + u0;
      const float* dht = dhs + row * H + u0;
      const float* dhb = dh + b * nu;
      for (int u = 0; u < nu; u += VL) {
        const int mm = std::min(VL, nu - u);
        store_n(z + u, (load_n(dhb + u, mm) + load_n(dht + u, mm)) * activation_deriv(kind, load_n(h + u, mm)), mm);
      }
    }
    barrier.wait(sense);  // all of dz_t is written
    if (nu > 0) gemm_part(part, dz + static_cast<size_t>(t) * B * H, H, H, nullptr, 0, 0, packed, npanels, dprod, ldd);
    for (int b = part.b0; b < part.b1 && nu > 0; ++b) {
      if (t >= lengths[b]) continue;
      std::memcpy(dh + b * nu, dprod + static_cast<size_t>(b) * ldd, sizeof(float) * nu);
    }
    if (sg != nullptr) sg->add(part.chunk, t * B + part.b0, t * B + part.b1, s == T - 1);
  }
  for (int b = part.b0; b < part.b1; ++b) std::memcpy(dh0 + static_cast<size_t>(b) * H + u0, dh + b * nu, sizeof(float) * nu);
}

ffi::Error check_dims(const char* what, ffi::Span<const int64_t> dims, std::initializer_list<int64_t> expected) {
  if (dims.size() != expected.size()) {
    return ffi::Error::InvalidArgument(std::string(what) + ": unexpected rank");
  }
  size_t i = 0;
  for (int64_t e : expected) {
    if (dims[i++] != e) return ffi::Error::InvalidArgument(std::string(what) + ": unexpected shape");
  }
  return ffi::Error::Success();
}

#define JAXRNN_CHECK(expr)              \
  do {                                  \
    ffi::Error err_ = (expr);           \
    if (err_.failure()) return err_;    \
  } while (0)

ffi::Error LstmForward(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w_ih, ffi::Buffer<ffi::F32> bias,
                       ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                       ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::S32> ids, ffi::ResultBuffer<ffi::F32> act,
                       ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> cs, ffi::ResultBuffer<ffi::F32> hT,
                       ffi::ResultBuffer<ffi::F32> cT, bool reverse, bool save, int32_t threads,
                       int32_t split, int32_t projection, ffi::ThreadPool pool) {
  const auto xd = xs.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("xs: expected rank 3");
  const auto hd = h0.dimensions();
  if (hd.size() != 2) return ffi::Error::InvalidArgument("h0: expected rank 2");
  const Dims d{static_cast<int>(xd[0]), static_cast<int>(xd[1]), static_cast<int>(hd[1]), static_cast<int>(xd[2])};
  const int64_t T = d.T, B = d.B, H = d.H, I = d.I;
  JAXRNN_CHECK(check_dims("w_ih", w_ih.dimensions(), {I, 4 * H}));
  const int32_t* ids_p = nullptr;
  if (ids.element_count() == 0) {
    JAXRNN_CHECK(check_dims("bias", bias.dimensions(), {4 * H}));
  } else {  // a table of per-input biases: z_t = x_t w_ih + h_{t-1} w_hh + bias[ids[t, b]]
    const auto bd = bias.dimensions();
    if (bd.size() != 2 || bd[1] != 4 * H) return ffi::Error::InvalidArgument("bias: expected (rows, 4H) with ids");
    JAXRNN_CHECK(check_dims("ids", ids.dimensions(), {T * B}));
    ids_p = ids.typed_data();
    for (int64_t r = 0; r < T * B; ++r) {
      if (ids_p[r] < 0 || ids_p[r] >= bd[0]) return ffi::Error::InvalidArgument("ids: expected values in [0, rows of bias)");
    }
  }
  JAXRNN_CHECK(check_dims("w_hh", w.dimensions(), {H, 4 * H}));
  JAXRNN_CHECK(check_dims("h0", hd, {B, H}));
  JAXRNN_CHECK(check_dims("c0", c0.dimensions(), {B, H}));
  JAXRNN_CHECK(check_dims("lengths", lengths.dimensions(), {B}));
  JAXRNN_CHECK(check_dims("hs", hs->dimensions(), {T, B, H}));
  JAXRNN_CHECK(check_dims("h_T", hT->dimensions(), {B, H}));
  JAXRNN_CHECK(check_dims("c_T", cT->dimensions(), {B, H}));
  float* act_p = nullptr;
  float* cs_p = nullptr;
  if (save) {
    JAXRNN_CHECK(check_dims("a", act->dimensions(), {T * B, 4 * H}));
    JAXRNN_CHECK(check_dims("cs", cs->dimensions(), {T, B, H}));
    act_p = act->typed_data();
    cs_p = cs->typed_data();
    advise_huge_pages(act_p, sizeof(float) * T * B * 4 * H);
    advise_huge_pages(cs_p, sizeof(float) * T * B * H);
  }
  advise_huge_pages(hs->typed_data(), sizeof(float) * T * B * H);
  run_split(pool, d, d.I + d.H, 4, threads, split, /*caller_works=*/save, [&](const Part& part, Barrier& barrier) {
    lstm_forward_member(part, barrier, d, reverse, xs.typed_data(), w_ih.typed_data(), bias.typed_data(),
                        w.typed_data(), h0.typed_data(), c0.typed_data(), lengths.typed_data(), ids_p, act_p,
                        hs->typed_data(), cs_p, hT->typed_data(), cT->typed_data(), projection);
  });
  return ffi::Error::Success();
}

ffi::Error LstmBackward(ffi::Buffer<ffi::F32> act, ffi::Buffer<ffi::F32> cs, ffi::Buffer<ffi::F32> c0,
                        ffi::Buffer<ffi::F32> dhs, ffi::Buffer<ffi::F32> dhT, ffi::Buffer<ffi::F32> dcT,
                        ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::F32> xs,
                        ffi::Buffer<ffi::F32> hs, ffi::Buffer<ffi::F32> h0, ffi::ResultBuffer<ffi::F32> dz,
                        ffi::ResultBuffer<ffi::F32> dh0, ffi::ResultBuffer<ffi::F32> dc0,
                        ffi::ResultBuffer<ffi::F32> dw_ih, ffi::ResultBuffer<ffi::F32> db,
                        ffi::ResultBuffer<ffi::F32> dw_hh, bool reverse, int32_t threads, int32_t split,
                        ffi::ThreadPool pool) {
  const auto cd = cs.dimensions();
  if (cd.size() != 3) return ffi::Error::InvalidArgument("cs: expected rank 3");
  const Dims d{static_cast<int>(cd[0]), static_cast<int>(cd[1]), static_cast<int>(cd[2]), 0};
  const int64_t T = d.T, B = d.B, H = d.H;
  JAXRNN_CHECK(check_dims("a", act.dimensions(), {T * B, 4 * H}));
  JAXRNN_CHECK(check_dims("cs", cs.dimensions(), {T, B, H}));
  JAXRNN_CHECK(check_dims("c0", c0.dimensions(), {B, H}));
  JAXRNN_CHECK(check_dims("dhs", dhs.dimensions(), {T, B, H}));
  JAXRNN_CHECK(check_dims("dh_T", dhT.dimensions(), {B, H}));
  JAXRNN_CHECK(check_dims("dc_T", dcT.dimensions(), {B, H}));
  JAXRNN_CHECK(check_dims("w_hh", w.dimensions(), {H, 4 * H}));
  JAXRNN_CHECK(check_dims("lengths", lengths.dimensions(), {B}));
  JAXRNN_CHECK(check_dims("dz", dz->dimensions(), {T * B, 4 * H}));
  const auto xd = xs.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("xs: expected rank 3");
  const int64_t I = xd[2];
  JAXRNN_CHECK(check_dims("xs", xd, {T, B, I}));
  JAXRNN_CHECK(check_dims("hs", hs.dimensions(), {T, B, H}));
  JAXRNN_CHECK(check_dims("h0", h0.dimensions(), {B, H}));
  // dW_ih, db and dW_hh of shape (0,): the weight gradients are left to jaxrnn_weight_grads (jaxrnn_step_grads
  // says when).
  const bool grads = dw_hh->dimensions().size() == 2;
  if (grads) {
    JAXRNN_CHECK(check_dims("dW_ih", dw_ih->dimensions(), {I, 4 * H}));
    JAXRNN_CHECK(check_dims("db", db->dimensions(), {4 * H}));
    JAXRNN_CHECK(check_dims("dW_hh", dw_hh->dimensions(), {H, 4 * H}));
  }
  if (dz->typed_data() != act.typed_data()) {  // XLA did not alias: start from a copy
    std::memcpy(dz->typed_data(), act.typed_data(), sizeof(float) * T * B * 4 * H);
  }
  StepGrads sg{GradOperands{d.T, d.B, static_cast<int>(I), d.H, 4 * d.H, 4 * d.H, reverse, xs.typed_data(),
                            hs.typed_data(), h0.typed_data(), dz->typed_data(), dz->typed_data(), dw_ih->typed_data(),
                            db->typed_data(), dw_hh->typed_data()}};
  sg.chunks = grads ? step_grad_chunks(d, 4 * d.H, 4, sg.o.I, sg.o.Gh, split, pool) : 0;
  const PartJob job = [&](const Part& part, Barrier& barrier) {
    lstm_backward_member(part, barrier, d, reverse, dz->typed_data(), cs.typed_data(), c0.typed_data(),
                         dhs.typed_data(), dhT.typed_data(), dcT.typed_data(), w.typed_data(),
                         lengths.typed_data(), dh0->typed_data(), dc0->typed_data(), sg.chunks > 0 ? &sg : nullptr);
  };
  if (sg.chunks > 0) {
    std::vector<float> storage;
    run_step_grads(pool, d, 4 * d.H, 4, threads, sg, storage, job);
  } else {
    run_split(pool, d, 4 * d.H, 4, threads, split, /*caller_works=*/true, job);
    if (grads) weight_grads(pool, sg.o, threads);
  }
  return ffi::Error::Success();
}

ffi::Error GruForward(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w_ih, ffi::Buffer<ffi::F32> bias,
                      ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b_hn, ffi::Buffer<ffi::F32> h0,
                      ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> act, ffi::ResultBuffer<ffi::F32> ms,
                      ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> hT, bool reverse, bool save,
                      int32_t threads, int32_t split, ffi::ThreadPool pool) {
  const auto xd = xs.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("xs: expected rank 3");
  const auto hd = h0.dimensions();
  if (hd.size() != 2) return ffi::Error::InvalidArgument("h0: expected rank 2");
  const Dims d{static_cast<int>(xd[0]), static_cast<int>(xd[1]), static_cast<int>(hd[1]), static_cast<int>(xd[2])};
  const int64_t T = d.T, B = d.B, H = d.H, I = d.I;
  JAXRNN_CHECK(check_dims("w_ih", w_ih.dimensions(), {I, 3 * H}));
  JAXRNN_CHECK(check_dims("bias", bias.dimensions(), {3 * H}));
  JAXRNN_CHECK(check_dims("w_hh", w.dimensions(), {H, 3 * H}));
  JAXRNN_CHECK(check_dims("b_hn", b_hn.dimensions(), {H}));
  JAXRNN_CHECK(check_dims("h0", hd, {B, H}));
  JAXRNN_CHECK(check_dims("lengths", lengths.dimensions(), {B}));
  JAXRNN_CHECK(check_dims("hs", hs->dimensions(), {T, B, H}));
  JAXRNN_CHECK(check_dims("h_T", hT->dimensions(), {B, H}));
  float* act_p = nullptr;
  float* m_p = nullptr;
  if (save) {
    JAXRNN_CHECK(check_dims("a", act->dimensions(), {T * B, 3 * H}));
    JAXRNN_CHECK(check_dims("m", ms->dimensions(), {T * B, H}));
    act_p = act->typed_data();
    m_p = ms->typed_data();
    advise_huge_pages(act_p, sizeof(float) * T * B * 3 * H);
    advise_huge_pages(m_p, sizeof(float) * T * B * H);
  }
  advise_huge_pages(hs->typed_data(), sizeof(float) * T * B * H);
  run_split(pool, d, d.I + d.H, 3, threads, split, /*caller_works=*/save, [&](const Part& part, Barrier& barrier) {
    gru_forward_member(part, barrier, d, reverse, xs.typed_data(), w_ih.typed_data(), bias.typed_data(),
                       w.typed_data(), b_hn.typed_data(), h0.typed_data(), lengths.typed_data(), act_p, m_p,
                       hs->typed_data(), hT->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error GruBackward(ffi::Buffer<ffi::F32> act, ffi::Buffer<ffi::F32> ms, ffi::Buffer<ffi::F32> hs,
                       ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> dhs, ffi::Buffer<ffi::F32> dhT,
                       ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> dzx,
                       ffi::ResultBuffer<ffi::F32> dzh, ffi::ResultBuffer<ffi::F32> dh0, bool reverse,
                       int32_t threads, int32_t split, ffi::ThreadPool pool) {
  const auto hd = hs.dimensions();
  if (hd.size() != 3) return ffi::Error::InvalidArgument("hs: expected rank 3");
  const Dims d{static_cast<int>(hd[0]), static_cast<int>(hd[1]), static_cast<int>(hd[2]), 0};
  const int64_t T = d.T, B = d.B, H = d.H;
  JAXRNN_CHECK(check_dims("a", act.dimensions(), {T * B, 3 * H}));
  JAXRNN_CHECK(check_dims("m", ms.dimensions(), {T * B, H}));
  JAXRNN_CHECK(check_dims("h0", h0.dimensions(), {B, H}));
  JAXRNN_CHECK(check_dims("dhs", dhs.dimensions(), {T, B, H}));
  JAXRNN_CHECK(check_dims("dh_T", dhT.dimensions(), {B, H}));
  JAXRNN_CHECK(check_dims("w_hh", w.dimensions(), {H, 3 * H}));
  JAXRNN_CHECK(check_dims("lengths", lengths.dimensions(), {B}));
  JAXRNN_CHECK(check_dims("dz_x", dzx->dimensions(), {T * B, 3 * H}));
  JAXRNN_CHECK(check_dims("dz_h", dzh->dimensions(), {T * B, 3 * H}));
  if (dzx->typed_data() != act.typed_data()) {  // XLA did not alias: start from a copy
    std::memcpy(dzx->typed_data(), act.typed_data(), sizeof(float) * T * B * 3 * H);
  }
  advise_huge_pages(dzh->typed_data(), sizeof(float) * T * B * 3 * H);
  run_split(pool, d, 3 * d.H, 3, threads, split, /*caller_works=*/true, [&](const Part& part, Barrier& barrier) {
    gru_backward_member(part, barrier, d, reverse, dzx->typed_data(), ms.typed_data(), hs.typed_data(),
                        h0.typed_data(), dhs.typed_data(), dhT.typed_data(), w.typed_data(), lengths.typed_data(),
                        dzh->typed_data(), dh0->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error GruBeforeForward(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w_ih, ffi::Buffer<ffi::F32> bias,
                            ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::S32> lengths,
                            ffi::ResultBuffer<ffi::F32> act, ffi::ResultBuffer<ffi::F32> qs,
                            ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> hT, bool reverse, bool save,
                            int32_t threads, int32_t split, ffi::ThreadPool pool) {
  const auto xd = xs.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("xs: expected rank 3");
  const auto hd = h0.dimensions();
  if (hd.size() != 2) return ffi::Error::InvalidArgument("h0: expected rank 2");
  const Dims d{static_cast<int>(xd[0]), static_cast<int>(xd[1]), static_cast<int>(hd[1]), static_cast<int>(xd[2])};
  const int64_t T = d.T, B = d.B, H = d.H, I = d.I;
  JAXRNN_CHECK(check_dims("w_ih", w_ih.dimensions(), {I, 3 * H}));
  JAXRNN_CHECK(check_dims("bias", bias.dimensions(), {3 * H}));
  JAXRNN_CHECK(check_dims("w_hh", w.dimensions(), {H, 3 * H}));
  JAXRNN_CHECK(check_dims("h0", hd, {B, H}));
  JAXRNN_CHECK(check_dims("lengths", lengths.dimensions(), {B}));
  JAXRNN_CHECK(check_dims("hs", hs->dimensions(), {T, B, H}));
  JAXRNN_CHECK(check_dims("h_T", hT->dimensions(), {B, H}));
  float* act_p = nullptr;
  float* q_p = nullptr;
  std::unique_ptr<float[]> q_step;  // inference: one step's q, shared by the team
  if (save) {
    JAXRNN_CHECK(check_dims("a", act->dimensions(), {T * B, 3 * H}));
    JAXRNN_CHECK(check_dims("q", qs->dimensions(), {T * B, H}));
    act_p = act->typed_data();
    q_p = qs->typed_data();
    advise_huge_pages(act_p, sizeof(float) * T * B * 3 * H);
    advise_huge_pages(q_p, sizeof(float) * T * B * H);
  } else {
    q_step.reset(new float[static_cast<size_t>(B) * H]);
    q_p = q_step.get();
  }
  advise_huge_pages(hs->typed_data(), sizeof(float) * T * B * H);
  run_split(pool, d, d.I + d.H, 3, threads, split, /*caller_works=*/save, [&](const Part& part, Barrier& barrier) {
    gru_before_forward_member(part, barrier, d, reverse, xs.typed_data(), w_ih.typed_data(), bias.typed_data(),
                              w.typed_data(), h0.typed_data(), lengths.typed_data(), act_p, q_p, save,
                              hs->typed_data(), hT->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error GruBeforeBackward(ffi::Buffer<ffi::F32> act, ffi::Buffer<ffi::F32> hs, ffi::Buffer<ffi::F32> h0,
                             ffi::Buffer<ffi::F32> dhs, ffi::Buffer<ffi::F32> dhT, ffi::Buffer<ffi::F32> w,
                             ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> dz,
                             ffi::ResultBuffer<ffi::F32> dh0, bool reverse, int32_t threads, int32_t split, ffi::ThreadPool pool) {
  const auto hd = hs.dimensions();
  if (hd.size() != 3) return ffi::Error::InvalidArgument("hs: expected rank 3");
  const Dims d{static_cast<int>(hd[0]), static_cast<int>(hd[1]), static_cast<int>(hd[2]), 0};
  const int64_t T = d.T, B = d.B, H = d.H;
  JAXRNN_CHECK(check_dims("a", act.dimensions(), {T * B, 3 * H}));
  JAXRNN_CHECK(check_dims("h0", h0.dimensions(), {B, H}));
  JAXRNN_CHECK(check_dims("dhs", dhs.dimensions(), {T, B, H}));
  JAXRNN_CHECK(check_dims("dh_T", dhT.dimensions(), {B, H}));
  JAXRNN_CHECK(check_dims("w_hh", w.dimensions(), {H, 3 * H}));
  JAXRNN_CHECK(check_dims("lengths", lengths.dimensions(), {B}));
  JAXRNN_CHECK(check_dims("dz", dz->dimensions(), {T * B, 3 * H}));
  if (dz->typed_data() != act.typed_data()) {  // XLA did not alias: start from a copy
    std::memcpy(dz->typed_data(), act.typed_data(), sizeof(float) * T * B * 3 * H);
  }
  run_split(pool, d, 3 * d.H, 3, threads, split, /*caller_works=*/true, [&](const Part& part, Barrier& barrier) {
    gru_before_backward_member(part, barrier, d, reverse, dz->typed_data(), hs.typed_data(), h0.typed_data(),
                               dhs.typed_data(), dhT.typed_data(), w.typed_data(), lengths.typed_data(),
                               dh0->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error ElmanForward(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w_ih, ffi::Buffer<ffi::F32> bias,
                        ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::S32> lengths,
                        ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> hT, bool reverse, bool save,
                        int32_t activation, int32_t threads, int32_t split, ffi::ThreadPool pool) {
  const auto xd = xs.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("xs: expected rank 3");
  const auto hd = h0.dimensions();
  if (hd.size() != 2) return ffi::Error::InvalidArgument("h0: expected rank 2");
  if (activation < kTanh || activation > kLinear) return ffi::Error::InvalidArgument("activation: expected 0, 1 or 2");
  const Dims d{static_cast<int>(xd[0]), static_cast<int>(xd[1]), static_cast<int>(hd[1]), static_cast<int>(xd[2])};
  const int64_t T = d.T, B = d.B, H = d.H, I = d.I;
  JAXRNN_CHECK(check_dims("w_ih", w_ih.dimensions(), {I, H}));
  JAXRNN_CHECK(check_dims("bias", bias.dimensions(), {H}));
  JAXRNN_CHECK(check_dims("w_hh", w.dimensions(), {H, H}));
  JAXRNN_CHECK(check_dims("h0", hd, {B, H}));
  JAXRNN_CHECK(check_dims("lengths", lengths.dimensions(), {B}));
  JAXRNN_CHECK(check_dims("hs", hs->dimensions(), {T, B, H}));
  JAXRNN_CHECK(check_dims("h_T", hT->dimensions(), {B, H}));
  advise_huge_pages(hs->typed_data(), sizeof(float) * T * B * H);
  run_split(pool, d, d.I + d.H, 1, threads, split, /*caller_works=*/save, [&](const Part& part, Barrier& barrier) {
    elman_forward_member(part, barrier, d, reverse, activation, xs.typed_data(), w_ih.typed_data(),
                         bias.typed_data(), w.typed_data(), h0.typed_data(), lengths.typed_data(), hs->typed_data(),
                         hT->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error ElmanBackward(ffi::Buffer<ffi::F32> hs, ffi::Buffer<ffi::F32> dhs, ffi::Buffer<ffi::F32> dhT,
                         ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::F32> xs,
                         ffi::Buffer<ffi::F32> h0, ffi::ResultBuffer<ffi::F32> dz, ffi::ResultBuffer<ffi::F32> dh0,
                         ffi::ResultBuffer<ffi::F32> dw_ih, ffi::ResultBuffer<ffi::F32> db,
                         ffi::ResultBuffer<ffi::F32> dw_hh, bool reverse, int32_t activation, int32_t threads,
                         int32_t split, ffi::ThreadPool pool) {
  const auto hd = hs.dimensions();
  if (hd.size() != 3) return ffi::Error::InvalidArgument("hs: expected rank 3");
  if (activation < kTanh || activation > kLinear) return ffi::Error::InvalidArgument("activation: expected 0, 1 or 2");
  const Dims d{static_cast<int>(hd[0]), static_cast<int>(hd[1]), static_cast<int>(hd[2]), 0};
  const int64_t T = d.T, B = d.B, H = d.H;
  JAXRNN_CHECK(check_dims("dhs", dhs.dimensions(), {T, B, H}));
  JAXRNN_CHECK(check_dims("dh_T", dhT.dimensions(), {B, H}));
  JAXRNN_CHECK(check_dims("w_hh", w.dimensions(), {H, H}));
  JAXRNN_CHECK(check_dims("lengths", lengths.dimensions(), {B}));
  JAXRNN_CHECK(check_dims("dz", dz->dimensions(), {T * B, H}));
  const auto xd = xs.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("xs: expected rank 3");
  const int64_t I = xd[2];
  JAXRNN_CHECK(check_dims("xs", xd, {T, B, I}));
  JAXRNN_CHECK(check_dims("h0", h0.dimensions(), {B, H}));
  // As the LSTM's (jaxrnn_step_grads says where the call adds the weight gradients; elsewhere they are (0,)).
  const bool grads = dw_hh->dimensions().size() == 2;
  if (grads) {
    JAXRNN_CHECK(check_dims("dW_ih", dw_ih->dimensions(), {I, H}));
    JAXRNN_CHECK(check_dims("db", db->dimensions(), {H}));
    JAXRNN_CHECK(check_dims("dW_hh", dw_hh->dimensions(), {H, H}));
  }
  advise_huge_pages(dz->typed_data(), sizeof(float) * T * B * H);
  StepGrads sg{GradOperands{d.T, d.B, static_cast<int>(I), d.H, d.H, d.H, reverse, xs.typed_data(), hs.typed_data(),
                            h0.typed_data(), dz->typed_data(), dz->typed_data(), dw_ih->typed_data(), db->typed_data(),
                            dw_hh->typed_data()}};
  sg.chunks = grads ? step_grad_chunks(d, d.H, 1, sg.o.I, sg.o.Gh, split, pool) : 0;
  const PartJob job = [&](const Part& part, Barrier& barrier) {
    elman_backward_member(part, barrier, d, reverse, activation, hs.typed_data(), dhs.typed_data(), dhT.typed_data(),
                          w.typed_data(), lengths.typed_data(), dz->typed_data(), dh0->typed_data(),
                          sg.chunks > 0 ? &sg : nullptr);
  };
  if (sg.chunks > 0) {
    std::vector<float> storage;
    run_step_grads(pool, d, d.H, 1, threads, sg, storage, job);
  } else {
    run_split(pool, d, d.H, 1, threads, split, /*caller_works=*/true, job);
    if (grads) weight_grads(pool, sg.o, threads);
  }
  return ffi::Error::Success();
}

ffi::Error WeightGrads(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> hs, ffi::Buffer<ffi::F32> h0,
                       ffi::Buffer<ffi::F32> dzx, ffi::Buffer<ffi::F32> dzh, ffi::ResultBuffer<ffi::F32> dw_ih,
                       ffi::ResultBuffer<ffi::F32> db, ffi::ResultBuffer<ffi::F32> dw_hh, bool reverse,
                       int32_t threads, ffi::ThreadPool pool) {
  const auto xd = xs.dimensions(), hd = hs.dimensions(), zx = dzx.dimensions(), zh = dzh.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("xs: expected rank 3");
  if (hd.size() != 3) return ffi::Error::InvalidArgument("hs: expected rank 3");
  if (zx.size() != 2 || zh.size() != 2) return ffi::Error::InvalidArgument("dz: expected rank 2");
  const int64_t T = xd[0], B = xd[1], I = xd[2], H = hd[2], Gx = zx[1], Gh = zh[1];
  JAXRNN_CHECK(check_dims("hs", hd, {T, B, H}));
  JAXRNN_CHECK(check_dims("h0", h0.dimensions(), {B, H}));
  JAXRNN_CHECK(check_dims("dz_x", zx, {T * B, Gx}));
  JAXRNN_CHECK(check_dims("dz_h", zh, {T * B, Gh}));
  JAXRNN_CHECK(check_dims("dW_ih", dw_ih->dimensions(), {I, Gx}));
  JAXRNN_CHECK(check_dims("db", db->dimensions(), {Gx}));
  JAXRNN_CHECK(check_dims("dW_hh", dw_hh->dimensions(), {H, Gh}));
  const GradOperands o{static_cast<int>(T), static_cast<int>(B), static_cast<int>(I), static_cast<int>(H),
                       static_cast<int>(Gx), static_cast<int>(Gh), reverse, xs.typed_data(), hs.typed_data(),
                       h0.typed_data(), dzx.typed_data(), dzh.typed_data(), dw_ih->typed_data(), db->typed_data(),
                       dw_hh->typed_data()};
  weight_grads(pool, o, threads);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Decoding: a stacked LSTM language model sampling N tokens.
// ---------------------------------------------------------------------------

// The token argmax_v(logits[v] / tau + noise[v]) (Gumbel-max: a draw from
// softmax(logits / tau)), or argmax_v logits[v] when greedy; the lowest id
// among ties, and the first NaN if there is one (as jnp.argmax).
inline int32_t sample_row(const float* logits, const float* noise, int V, float tau, bool greedy) {
  int32_t best_id = 0;
  float best = -INFINITY;
  for (int v = 0; v < V; ++v) {
    const float score = greedy ? logits[v] : logits[v] / tau + noise[v];
    if (std::isnan(score)) return v;
    if (score > best) {
      best = score;
      best_id = v;
    }
  }
  return best_id;
}

// The decode's weights, packed once per call and read by every thread.
struct DecodeWeights {
  int L, B, H, V, N;
  const float* table;                 // (V, 4H): layer 0's projected input per token, bias included
  const float* w_hh0;                 // (H, 4H): layer 0's recurrent kernel
  const float* w_up;                  // (L - 1, 2H, 4H): [w_ih; w_hh] per upper layer
  const float* packed0;               // layer 0's w_hh, panels of H x NR (rows split only)
  int np0;
  std::vector<const float*> packed;   // layers 1..L-1: [w_hh; w_ih], panels of 2H x NR (rows split only)
  int np;
  const float* b;                     // (L - 1, 4H)
  const float* packed_out;            // w_out, panels of H x NR
  int np_out;
  const float* b_out;                 // (V,)
  const float* h0;                    // (L, B, H)
  const float* c0;
  const float* logits0;               // (B, V)
  const float* noise;                 // (N, B, V)
  float tau;
  int32_t* tokens;                    // (N, B)
  float* logits;                      // (N, B, V) or null
};

// Step i's tokens of rows [b0, b1) from their logits (scores, row stride ldv,
// the first row b0): logits0 at step 0, else the output layer's product plus its
// bias; sampled into tok[0 .. b1 - b0), and, for the rows in [s0, s1), saved
// (the logits when asked for, and w.tokens).
void sample_rows(const DecodeWeights& w, int i, int b0, int b1, float* scores, int ldv, int32_t* tok, int s0, int s1) {
  const int V = w.V;
  const bool greedy = !(w.tau > 0.0f);
  for (int r = b0; r < b1; ++r) {
    const size_t row = static_cast<size_t>(i) * w.B + r;
    const bool saves = s0 <= r && r < s1;
    float* lrow = scores + static_cast<size_t>(r - b0) * ldv;
    if (i == 0) {
      std::memcpy(lrow, w.logits0 + static_cast<size_t>(r) * V, sizeof(float) * V);
    } else {
      for (int v = 0; v < V; ++v) lrow[v] += w.b_out[v];
    }
    if (saves && w.logits != nullptr) std::memcpy(w.logits + row * V, lrow, sizeof(float) * V);
    tok[r - b0] = sample_row(lrow, w.noise + row * V, V, w.tau, greedy);
    if (saves) w.tokens[row] = tok[r - b0];
  }
}

// Rows [b0, b1) through all N steps: sample from the current logits, feed the
// token through the L layers, project to the next logits. Rows never meet.
void lstm_decode_rows(const DecodeWeights& w, int b0, int b1) {
  const int L = w.L, B = w.B, H = w.H, G = 4 * H, nb = b1 - b0;
  const int ldg = w.np0 * NR, ldv = w.np_out * NR;
  std::vector<float> h(static_cast<size_t>(L) * nb * H), c(h.size());
  std::vector<float> gates(static_cast<size_t>(nb) * std::max(ldg, w.np * NR) + NR);
  std::vector<float> scores(static_cast<size_t>(nb) * ldv + NR);
  std::vector<int32_t> tok(nb);
  for (int l = 0; l < L; ++l) {
    for (int r = 0; r < nb; ++r) {
      const size_t src = (static_cast<size_t>(l) * B + b0 + r) * H, dst = (static_cast<size_t>(l) * nb + r) * H;
      std::memcpy(&h[dst], w.h0 + src, sizeof(float) * H);
      std::memcpy(&c[dst], w.c0 + src, sizeof(float) * H);
    }
  }
  for (int i = 0; i < w.N; ++i) {
    sample_rows(w, i, b0, b1, scores.data(), ldv, tok.data(), b0, b1);
    if (i + 1 == w.N) break;
    // Layer 0: z = h w_hh + table[token].
    float* h_l = &h[0];
    float* c_l = &c[0];
    gemm_rows(h_l, H, H, nullptr, 0, 0, nb, w.packed0, w.np0, gates.data(), ldg);
    for (int r = 0; r < nb; ++r) {
      lstm_units(&gates[static_cast<size_t>(r) * ldg], H, w.table + static_cast<size_t>(tok[r]) * G, H, H,
                 c_l + static_cast<size_t>(r) * H, h_l + static_cast<size_t>(r) * H, nullptr, nullptr);
    }
    // Layers 1..L-1: z = [h h_below] [w_hh; w_ih] + b (the recurrent rows first, as lstm_decode_units sums).
    const int ldu = w.np * NR;
    for (int l = 1; l < L; ++l) {
      const float* below = &h[static_cast<size_t>(l - 1) * nb * H];
      h_l = &h[static_cast<size_t>(l) * nb * H];
      c_l = &c[static_cast<size_t>(l) * nb * H];
      gemm_rows(h_l, H, H, below, H, H, nb, w.packed[l - 1], w.np, gates.data(), ldu);
      for (int r = 0; r < nb; ++r) {
        lstm_units(&gates[static_cast<size_t>(r) * ldu], H, w.b + static_cast<size_t>(l - 1) * G, H, H,
                   c_l + static_cast<size_t>(r) * H, h_l + static_cast<size_t>(r) * H, nullptr, nullptr);
      }
    }
    // The next logits (their bias is added above, before they are read).
    gemm_rows(h_l, H, H, nullptr, 0, 0, nb, w.packed_out, w.np_out, scores.data(), ldv);
  }
}

// Units split: member k of a team of m holds hidden units [u0, u1) of every layer
// (its columns of the packed weights, a 1/m share) for all B rows. A layer's
// units need all of the h below them, so each layer of a step ends at a
// barrier, split in two (Barrier::arrive, wait_arrived) around work that needs
// nothing written before it: after layer l - 1, layer l's recurrent product
// h_{t-1} w_hh (its h is complete since the step before); after the top layer,
// the next step's layer-0 product. A member held up (a page fault, an
// interrupt, a slower core) is then absorbed by that work instead of stalling
// the other. Every member computes the output layer's logits and samples the
// tokens of every row itself (the output layer is a few percent of a step's
// work), so no barrier waits for the tokens; it saves those of its rows
// [B k / m, B (k + 1) / m). The h of every layer is double-buffered by step
// parity (a member may write its units of the next h while another still
// reads the current one); c is updated in place, by its units' owner alone.
// The same sums in the same order as lstm_decode_rows (an upper layer's
// recurrent rows first, then its input's): the tokens and logits are bit for
// bit the same.
struct DecodeState {
  float* h;  // (2, L, B, H): h of every layer, current and next (by step parity)
  float* c;  // (L, B, H)
};

void lstm_decode_units(const DecodeWeights& w, const DecodeState& st, int k, int m, Barrier& barrier) {
  const int L = w.L, B = w.B, H = w.H, G = 4 * H;
  int u0, u1;
  unit_range(H, k, m, &u0, &u1);
  const int nu = u1 - u0;
  const int rb0 = static_cast<int>(static_cast<int64_t>(B) * k / m);
  const int rb1 = static_cast<int>(static_cast<int64_t>(B) * (k + 1) / m);
  int np0 = 0, np = 0;
  std::vector<Scratch> packs(2 * L);
  const float* packed0 = pack_columns(packs[0], nullptr, 0, w.w_hh0, H, G, 0, 4, H, u0, nu, &np0);
  std::vector<const float*> packed_hh(L, nullptr), packed_ih(L, nullptr);  // layers 1..L-1, separately
  for (int l = 1; l < L; ++l) {
    const float* wl = w.w_up + static_cast<size_t>(l - 1) * 2 * H * G;  // [w_ih; w_hh]
    packed_ih[l] = pack_columns(packs[2 * l], wl, H, nullptr, 0, G, 0, 4, H, u0, nu, &np);
    packed_hh[l] = pack_columns(packs[2 * l + 1], wl + static_cast<size_t>(H) * G, H, nullptr, 0, G, 0, 4, H, u0, nu, &np);
  }
  const int ldg = std::max(np0, np) * NR, ldv = w.np_out * NR;
  std::vector<float> gates(static_cast<size_t>(B) * ldg + NR);  // the layer in progress (one thread's, in turn)
  std::vector<float> scores(static_cast<size_t>(B) * ldv + NR);
  std::vector<int32_t> tok(B);
  const size_t layer = static_cast<size_t>(B) * H;
  const bool work = nu > 0;
  // Layer 0's product h_{t-1} w_hh (its input enters as the bias: the token's row of the table).
  const auto layer0_product = [&](const float* h) {
    gemm_rows(h, H, H, nullptr, 0, 0, B, packed0, np0, gates.data(), ldg);
  };
  int sense = 0;
  if (work && w.N > 1) layer0_product(st.h);  // step 0's
  for (int i = 0; i < w.N; ++i) {
    float* h_cur = st.h + static_cast<size_t>(i % 2) * L * layer;
    float* h_nxt = st.h + static_cast<size_t>((i + 1) % 2) * L * layer;
    sample_rows(w, i, 0, B, scores.data(), ldv, tok.data(), rb0, rb1);
    if (i + 1 == w.N) break;
    for (int l = 0; l < L; ++l) {
      if (l > 0) {  // the barrier after layer l - 1, around this layer's recurrent product
        barrier.arrive(sense);
        if (work) gemm_rows(h_cur + l * layer, H, H, nullptr, 0, 0, B, packed_hh[l], np, gates.data(), ldg);
        barrier.wait_arrived(sense);
        if (work) gemm_rows<true>(h_nxt + (l - 1) * layer, H, H, nullptr, 0, 0, B, packed_ih[l], np, gates.data(), ldg);
      }
      if (!work) continue;
      float* c_l = st.c + l * layer;
      for (int r = 0; r < B; ++r) {
        const float* bias = l == 0 ? w.table + static_cast<size_t>(tok[r]) * G : w.b + static_cast<size_t>(l - 1) * G;
        lstm_units(&gates[static_cast<size_t>(r) * ldg], nu, bias + u0, H, nu, c_l + static_cast<size_t>(r) * H + u0,
                   h_nxt + l * layer + static_cast<size_t>(r) * H + u0, nullptr, nullptr);
      }
    }
    // The barrier after the top layer, around the next step's layer-0 product (its h, complete since the
    // barrier after layer 0; with one layer, that is this barrier).
    const bool next0 = work && i + 2 < w.N;  // the next step has a layer 0 to run
    barrier.arrive(sense);
    if (next0 && L > 1) layer0_product(h_nxt);
    barrier.wait_arrived(sense);
    if (next0 && L == 1) layer0_product(h_nxt);
    // The next logits of every row (their bias is added above, before they are read).
    gemm_rows(h_nxt + (L - 1) * layer, H, H, nullptr, 0, 0, B, w.packed_out, w.np_out, scores.data(), ldv);
  }
}

// split="auto" decodes by units (lstm_decode_units) when two threads or more
// may run it, every member holds at least one block of units, the weights
// streamed every step (every layer's packed weights) take at least
// kDecodeUnitsMinWeightBytes, and the batch is too small to give each thread
// kDecodeRowsPerThread rows; else by rows. A member streams its share of the
// weights every step (rows: all of them), but a team meets at a barrier per
// layer and a chunk of rows never does; a batch of few rows leaves the rows
// split one thread. Measured on 2 cores (Ice Lake, L2 1.25 MiB per core; the
// character LM, V=65, embedding 64, 2 layers, 1000 tokens, medians of 15
// interleaved calls, ms per token, rows against units, with a barrier after
// the sampling too and none split): H=256 (3.1 MiB) B=1 0.130 against 0.065,
// B=8 0.195 against 0.104, B=32 0.338 against 0.322, B=64 0.756 against 0.739,
// B=128 1.48 against 1.54; H=128 (0.8 MiB) B=1 0.0147 against 0.0103, B=32
// 0.136 against 0.137; H=64 (0.2 MiB) B=1 a tie (0.0070), B=32 0.066 against
// 0.068. On the 2-core EPYC (Zen 4, L2 1 MiB per core, split barriers; ms per
// 1000 tokens, medians of 12-20 interleaved calls in one process, H=256): B=8
// 128 against 68, B=16 129-146 against 133-165, B=24 215-236 against 200-247,
// B=32 269-292 against 278-335 (six runs, rows ahead in each), B=48 425
// against 495, B=64 542-558 against 561-570. Rows from 16 per thread (B >= 32
// on 2 cores) keep the EPYC's faster split and the one without barriers, which
// a busy shared machine holds up less (the units' spread above is the wider);
// on the Ice Lake figures that costs at most 5% at B=32-64.
constexpr double kDecodeUnitsMinWeightBytes = 512.0 * 1024;
constexpr int kDecodeRowsPerThread = 16;

// Rows per chunk of a decode: few chunks, so that each streams the weights for
// as many rows as it can (a thread's chunk of 16 rows reads each panel for two
// register blocks of rows).
constexpr int kDecodeChunksPerThread = 1;

ffi::Error LstmDecode(ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::F32> w_hh0, ffi::Buffer<ffi::F32> w_up,
                      ffi::Buffer<ffi::F32> b_up, ffi::Buffer<ffi::F32> w_out, ffi::Buffer<ffi::F32> b_out,
                      ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> logits0,
                      ffi::Buffer<ffi::F32> noise, ffi::Buffer<ffi::F32> temperature,
                      ffi::ResultBuffer<ffi::S32> tokens, ffi::ResultBuffer<ffi::F32> logits, bool save_logits,
                      int32_t threads, int32_t split, ffi::ThreadPool pool) {
  const auto hd = h0.dimensions(), nd = noise.dimensions();
  if (hd.size() != 3) return ffi::Error::InvalidArgument("h0: expected rank 3 (L, B, H)");
  if (nd.size() != 3) return ffi::Error::InvalidArgument("noise: expected rank 3 (N, B, V)");
  const int64_t L = hd[0], B = hd[1], H = hd[2], N = nd[0], V = nd[2];
  JAXRNN_CHECK(check_dims("table", table.dimensions(), {V, 4 * H}));
  JAXRNN_CHECK(check_dims("w_hh0", w_hh0.dimensions(), {H, 4 * H}));
  JAXRNN_CHECK(check_dims("w_up", w_up.dimensions(), {L - 1, 2 * H, 4 * H}));
  JAXRNN_CHECK(check_dims("b_up", b_up.dimensions(), {L - 1, 4 * H}));
  JAXRNN_CHECK(check_dims("w_out", w_out.dimensions(), {H, V}));
  JAXRNN_CHECK(check_dims("b_out", b_out.dimensions(), {V}));
  JAXRNN_CHECK(check_dims("c0", c0.dimensions(), {L, B, H}));
  JAXRNN_CHECK(check_dims("logits0", logits0.dimensions(), {B, V}));
  JAXRNN_CHECK(check_dims("noise", nd, {N, B, V}));
  JAXRNN_CHECK(check_dims("temperature", temperature.dimensions(), {1}));
  JAXRNN_CHECK(check_dims("tokens", tokens->dimensions(), {N, B}));
  if (save_logits) JAXRNN_CHECK(check_dims("logits", logits->dimensions(), {N, B, V}));
  if (L < 1 || N < 1 || B < 1 || V < 1) return ffi::Error::Success();
  DecodeWeights w;
  w.L = L, w.B = B, w.H = H, w.V = V, w.N = N;
  w.table = table.typed_data();
  w.w_hh0 = w_hh0.typed_data();
  w.w_up = w_up.typed_data();
  w.b = b_up.typed_data();
  Scratch s_out;
  w.packed_out = pack_columns(s_out, w_out.typed_data(), H, nullptr, 0, V, 0, 1, V, 0, V, &w.np_out);
  w.b_out = b_out.typed_data();
  w.h0 = h0.typed_data();
  w.c0 = c0.typed_data();
  w.logits0 = logits0.typed_data();
  w.noise = noise.typed_data();
  w.tau = temperature.typed_data()[0];
  w.tokens = tokens->typed_data();
  w.logits = save_logits ? logits->typed_data() : nullptr;
  int n = static_cast<int>(pool.num_threads());
  if (threads > 0) n = std::min(n, static_cast<int>(threads));
  const double weight_bytes = 4.0 * H * 4 * H * (2 * L - 1) + 4.0 * H * V;
  const bool units = split != kSplitRows && n >= 2 && H >= 2 * VL &&
                     (split == kSplitUnits ||
                      (weight_bytes >= kDecodeUnitsMinWeightBytes && B < static_cast<int64_t>(n) * kDecodeRowsPerThread));
  if (units) {
    const int64_t layer = B * H;
    std::vector<float> h(static_cast<size_t>(2 * L * layer)), c(static_cast<size_t>(L * layer));
    std::memcpy(h.data(), h0.typed_data(), sizeof(float) * L * layer);
    std::memcpy(c.data(), c0.typed_data(), sizeof(float) * L * layer);
    const DecodeState st{h.data(), c.data()};
    const int members = std::min(n, static_cast<int>(H / VL));
    run_on_pool(pool, members, join_wait_us(N, B, H, (2 * L - 1) * H, 4), /*caller_works=*/false,
                [&](int k, int m, Barrier& barrier) { lstm_decode_units(w, st, k, m, barrier); });
    return ffi::Error::Success();
  }
  Scratch s0;
  std::vector<Scratch> s_up(L - 1);
  w.packed0 = pack_columns(s0, nullptr, 0, w.w_hh0, H, 4 * H, 0, 1, 4 * H, 0, 4 * H, &w.np0);
  w.np = 0;
  for (int l = 1; l < L; ++l) {
    const float* wl = w.w_up + static_cast<size_t>(l - 1) * 2 * H * 4 * H;
    // [w_hh; w_ih]: the recurrent rows first (see lstm_decode_units).
    w.packed.push_back(pack_columns(s_up[l - 1], wl + static_cast<size_t>(H) * 4 * H, H, wl, H, 4 * H, 0, 1, 4 * H, 0,
                                    4 * H, &w.np));
  }
  const int count = static_cast<int>(std::min<int64_t>(std::max<int64_t>(1, B / kMinChunkRows),
                                                        std::max(1, n) * kDecodeChunksPerThread));
  const int members = std::min(n, count);
  if (members <= 1) {
    lstm_decode_rows(w, 0, B);
    return ffi::Error::Success();
  }
  run_row_chunks(pool, members, count, B, H, /*caller_works=*/false,
                 [&](const Part& part, Barrier&) { lstm_decode_rows(w, part.b0, part.b1); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnLstmForward, LstmForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids: (T B,) rows of a bias table, or (0,)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // a
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h carries
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c carries
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h_T
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c_T
                                  .Attr<bool>("reverse")
                                  .Attr<bool>("save")
                                  .Attr<int32_t>("threads")
                                  .Attr<int32_t>("split")
                                  .Attr<int32_t>("projection")  // kProjection*
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnLstmBackward, LstmBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c carries
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dhs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dh_T
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dc_T
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs (T, B, I): I = 0 for ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h carries
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dz (over a)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dc0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW_ih
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW_hh
                                  .Attr<bool>("reverse")
                                  .Attr<int32_t>("threads")
                                  .Attr<int32_t>("split")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnGruForward, GruForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_hn
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Ret<ffi::Buffer<ffi::F32>>()  // a = [r u n]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // m
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h carries
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h_T
                                  .Attr<bool>("reverse")
                                  .Attr<bool>("save")
                                  .Attr<int32_t>("threads")
                                  .Attr<int32_t>("split")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnGruBackward, GruBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // m
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h carries
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dhs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dh_T
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dz_x (over a)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dz_h
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh0
                                  .Attr<bool>("reverse")
                                  .Attr<int32_t>("threads")
                                  .Attr<int32_t>("split")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnGruBeforeForward, GruBeforeForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Ret<ffi::Buffer<ffi::F32>>()  // a = [r u n]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // q = r h_{t-1}
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h carries
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h_T
                                  .Attr<bool>("reverse")
                                  .Attr<bool>("save")
                                  .Attr<int32_t>("threads")
                                  .Attr<int32_t>("split")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnGruBeforeBackward, GruBeforeBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h carries
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dhs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dh_T
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dz = [dz_r dz_u dz_n] (over a)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh0
                                  .Attr<bool>("reverse")
                                  .Attr<int32_t>("threads")
                                  .Attr<int32_t>("split")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnElmanForward, ElmanForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h carries
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h_T
                                  .Attr<bool>("reverse")
                                  .Attr<bool>("save")
                                  .Attr<int32_t>("activation")
                                  .Attr<int32_t>("threads")
                                  .Attr<int32_t>("split")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnElmanBackward, ElmanBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h carries
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dhs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dh_T
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dz
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW_ih, or (0,)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db, or (0,)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW_hh, or (0,)
                                  .Attr<bool>("reverse")
                                  .Attr<int32_t>("activation")
                                  .Attr<int32_t>("threads")
                                  .Attr<int32_t>("split")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnWeightGrads, WeightGrads,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h carries
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dz_x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dz_h
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW_ih
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW_hh
                                  .Attr<bool>("reverse")
                                  .Attr<int32_t>("threads")
                                  .Ctx<ffi::ThreadPool>());

// Whether the backward of the LSTM (gates 4) or the Elman RNN (gates 1) adds its weight gradients inside its
// loop at these shapes (its call then computes them; otherwise they are left to jaxrnn_weight_grads, which after
// a large model's loop is as fast, and leaves XLA free to order the ops around it: the character LM's step was
// 3-7% slower with them in the call).
extern "C" int jaxrnn_step_grads(int gates, int T, int B, int I, int H, int split) {
  return step_grads_fit(Dims{T, B, H, I}, gates * H, gates, I, gates * H, split) ? 1 : 0;
}

// Test hooks of the placement (tests/kernels/test_ffi.py): thread tid's state
// and last CPU (1 if read, 0 if not, -1 off Linux); and tid moved off `cpu`,
// its affinity right after the move written to after[0..n) (1 for each CPU
// allowed), then restored (1 if moved, 0 if not, -1 off Linux).
extern "C" int jaxrnn_thread_state(int tid, char* state, int* cpu) {
#if defined(__linux__)
  return thread_state(tid, state, cpu) ? 1 : 0;
#else
  return -1;
#endif
}

extern "C" int jaxrnn_move_thread_off(int tid, int cpu, uint8_t* after, int n) {
#if defined(__linux__)
  MovedThread moved;
  if (!move_off(tid, cpu, &moved)) return 0;
  cpu_set_t mask;
  const bool read = sched_getaffinity(tid, sizeof mask, &mask) == 0;
  restore(&moved, 1);
  for (int i = 0; i < n; ++i) after[i] = read && i < CPU_SETSIZE && CPU_ISSET(i, &mask) ? 1 : 0;
  return 1;
#else
  return -1;
#endif
}

// [calls that formed a team, calls that ran short-handed, threads moved off a
// caller's core] since the library was loaded.
extern "C" void jaxrnn_rnn_cpu_team_stats(int64_t* out) {
  out[0] = team_calls.load(std::memory_order_relaxed);
  out[1] = short_handed_calls.load(std::memory_order_relaxed);
  out[2] = moved_threads.load(std::memory_order_relaxed);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnLstmDecode, LstmDecode,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // table (V, 4H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh0 (H, 4H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_up (L - 1, 2H, 4H): [w_ih; w_hh] per upper layer
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_up (L - 1, 4H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_out (H, V)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_out (V,)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0 (L, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0 (L, B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logits0 (B, V)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // noise (N, B, V)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // temperature (1,)
                                  .Ret<ffi::Buffer<ffi::S32>>()  // tokens (N, B)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // logits (N, B, V) or (0,)
                                  .Attr<bool>("save_logits")
                                  .Attr<int32_t>("threads")
                                  .Attr<int32_t>("split")
                                  .Ctx<ffi::ThreadPool>());
