// Every schema of the tarp_fast native ops, in one place, and the Python module tarp_fast._C.
//
// The module itself exports nothing: importing it runs the static TORCH_LIBRARY registrations
// below and in the kernel translation units, after which the ops live under torch.ops.tarp_fast.
// Fake (meta) kernels and autograd formulas are registered from Python (tarp_fast/_native.py).
//
// This translation unit deliberately includes only <torch/library.h> and <Python.h> (not
// <torch/extension.h>, which drags in pybind11 and the whole C++ frontend): it keeps the build
// at a few seconds per file.
#include <Python.h>

#include <string>

#include <torch/library.h>
#include <torch/version.h>

#define TARP_STR2(x) #x
#define TARP_STR(x) TARP_STR2(x)

namespace tarp_fast {

// What this binary was compiled against; tarp_fast._ext compares it with the running torch.
static std::string build_info() {
  std::string s = "torch=" TARP_STR(TORCH_VERSION_MAJOR) "." TARP_STR(TORCH_VERSION_MINOR) "." TARP_STR(
      TORCH_VERSION_PATCH);
#ifdef TARP_FAST_WITH_CUDA
  s += ";cuda=1";
#else
  s += ";cuda=0";
#endif
#ifdef _OPENMP
  s += ";openmp=" TARP_STR(_OPENMP);
#else
  s += ";openmp=0";
#endif
#if defined(__clang__)
  s += ";compiler=clang " __clang_version__;
#elif defined(__GNUC__)
  s += ";compiler=gcc " __VERSION__;
#endif
  return s;
}

}  // namespace tarp_fast

TORCH_LIBRARY(tarp_fast, m) {
  // Forward of tarp_linear (DESIGN §2) on rows x [M, K] (the caller flattens x and residual).
  // Returns
  //   out   [M, N]            y = gate · act(pre) + skip_gate · x + residual
  //   pre   [M, N] or [0]     pre-activation, only when save_pre (activation or gate gradient)
  //   proj  [M, r + r*r]      [h; vec S] = [V_t; G_t] x per row ([M, r] bilinear, [0] no delta);
  //                           rows skipped by hard_skip hold 0
  //   scale [N, K], [T, N, K] or [0]   softplus(P_t Q_t + scale_offset) when P is given
  m.def(
      "native_tarp_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? U, Tensor? V, Tensor? G, "
      "Tensor? P, Tensor? Q, Tensor? task_index, Tensor? gate, Tensor? skip_gate, Tensor? residual, "
      "float scaling, float scale_offset, int num_tasks, int activation, int gate_kind, "
      "float gate_value, int skip_kind, float skip_value, bool hard_skip, bool save_pre) "
      "-> (Tensor out, Tensor pre, Tensor proj, Tensor scale)",
      {at::Tag::pt2_compliant_tag});
  // Backward: gradients of (x, weight, bias, U, V, G, P, Q, gate, skip_gate) for the bits set
  // in `needs` (tarp_common.h); the others, and those of absent inputs, are empty [0] tensors.
  // dresidual = dy is not computed.
  // Both ops check every argument (csrc/tarp_checks.h) before reading any data: they can be
  // called directly, without the Python validator.
  m.def(
      "native_tarp_bwd(Tensor dy, Tensor x, Tensor weight, Tensor? U, Tensor? V, Tensor? G, "
      "Tensor? P, Tensor? Q, Tensor? task_index, Tensor? gate, Tensor? skip_gate, Tensor pre, "
      "Tensor proj, Tensor scale, float scaling, int num_tasks, int activation, int gate_kind, "
      "float gate_value, int skip_kind, float skip_value, bool hard_skip, int needs) "
      "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dU, Tensor dV, Tensor dG, Tensor dP, "
      "Tensor dQ, Tensor dgate, Tensor dskip_gate)",
      {at::Tag::pt2_compliant_tag});
  m.def("build_info() -> str", &tarp_fast::build_info);
#ifdef TARP_FAST_WITH_CUDA
  // Device-side helpers for the Triton path (csrc/tarp_cuda.cu). No host sync, fixed output
  // shapes, so they are CUDA-graph safe.
  //   compact_rows: rows [M] int64 = kept rows (gate != 0) in order, then the dropped rows in
  //                 order; count [1] int64 = number of kept rows.
  m.def("compact_rows(Tensor gate) -> (Tensor rows, Tensor count)", {at::Tag::pt2_compliant_tag});
  //   group_by_task: stable counting sort of the rows by task (rows with gate == 0, or a task
  //                  outside [0, T), go to a last bucket T). perm [M] int64, counts [T + 1]
  //                  int64, offsets [T + 2] int64 (exclusive prefix sums of counts).
  m.def(
      "group_by_task(Tensor task_index, int num_tasks, Tensor? gate) "
      "-> (Tensor perm, Tensor counts, Tensor offsets)",
      {at::Tag::pt2_compliant_tag});
  //   segmented_sum: out[s] = sum of values[perm[i]] for i in [offsets[s], offsets[s + 1]);
  //                  values [M, D], perm [M] int64 or None (identity), offsets [S + 1] int64;
  //                  out [S, D]. Deterministic (no atomics), fp32 accumulation for fp16/bf16.
  m.def("segmented_sum(Tensor values, Tensor? perm, Tensor offsets) -> Tensor", {at::Tag::pt2_compliant_tag});
#endif
}

static PyModuleDef tarp_fast_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "tarp_fast native ops; importing registers them under torch.ops.tarp_fast",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&tarp_fast_c_module);
}
