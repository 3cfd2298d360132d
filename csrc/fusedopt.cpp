// Every fusedopt op's schema, in one place. Implementations register per device in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA); fake (meta) kernels live in fusedopt/_ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fusedopt, m) {
  // One Adam / AdamW step over many tensors, in the style of aten::_fused_adamw_.
  // Unlike aten's op, it also advances state_steps by one (so no separate launch is needed),
  // and when found_inf is given and non-zero it changes nothing at all (GradScaler's skipped step).
  // Grads are unscaled in place when grad_scale is given, as torch's fused step does.
  m.def(
      "adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, *, "
      "float lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "adam_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, *, "
      "Tensor lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  // One Adam / AdamW step (no amsgrad) with lean states (math and formats:
  // fusedopt/reference.py::adam_lean). exp_avgs and exp_avg_sqs share one dtype: a float dtype,
  // or uint8 (8-bit blockwise, with one fp32 absmax per 256 elements in exp_avg_absmaxes and
  // exp_avg_sq_absmaxes, which are empty otherwise). param_mode says how bf16 / fp16 params are
  // kept: nearest, master (param_extras: fp32 masters), compact (int8 corrections), kahan
  // (compensations in the params' dtype) or stochastic; param_extras is empty for nearest and
  // stochastic. Steps, grad_scale and found_inf as adam_'s.
  m.def(
      "adam_lean_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] exp_avg_absmaxes, Tensor(f!)[] exp_avg_sq_absmaxes, "
      "Tensor(g!)[] param_extras, Tensor(h!)[] state_steps, *, float lr, float beta1, "
      "float beta2, float weight_decay, float eps, bool maximize, bool decoupled_weight_decay, "
      "str param_mode, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "adam_lean_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] exp_avg_absmaxes, Tensor(f!)[] exp_avg_sq_absmaxes, "
      "Tensor(g!)[] param_extras, Tensor(h!)[] state_steps, *, Tensor lr, float beta1, "
      "float beta2, float weight_decay, float eps, bool maximize, bool decoupled_weight_decay, "
      "str param_mode, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // One Lion step over many tensors (math: fusedopt/reference.py::lion). Lion keeps no step count.
  m.def(
      "lion_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, *, float lr, "
      "float beta1, float beta2, float weight_decay, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "lion_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, *, "
      "Tensor lr, float beta1, float beta2, float weight_decay, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // One Lion step with lean states (math and formats: fusedopt/reference.py::lion_lean): the
  // lists, param_mode and state_steps as adam_lean_'s, with exp_avgs its one state (signed code).
  m.def(
      "lion_lean_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_absmaxes, Tensor(e!)[] param_extras, Tensor(f!)[] state_steps, *, "
      "float lr, float beta1, float beta2, float weight_decay, bool maximize, str param_mode, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "lion_lean_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_absmaxes, Tensor(e!)[] param_extras, Tensor(f!)[] state_steps, *, "
      "Tensor lr, float beta1, float beta2, float weight_decay, bool maximize, str param_mode, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // One SGD step over many tensors, in the style of aten::_fused_sgd_ (math:
  // fusedopt/reference.py::sgd). momentum_buffers is empty when momentum is 0; on is_first_step
  // the buffers are written (set to the grad) and never read.
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, *, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, bool is_first_step, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "sgd_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, *, "
      "Tensor lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, bool is_first_step, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // One SGD step with lean states (math and formats: fusedopt/reference.py::sgd_lean): the
  // lists, param_mode and state_steps as adam_lean_'s, with momentum_buffers its one state
  // (signed code; empty, with their absmaxes, when momentum is 0); is_first_step as sgd_'s.
  m.def(
      "sgd_lean_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "Tensor(d!)[] momentum_buffer_absmaxes, Tensor(e!)[] param_extras, "
      "Tensor(f!)[] state_steps, *, float lr, float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool maximize, bool is_first_step, str param_mode, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "sgd_lean_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, "
      "Tensor(c!)[] momentum_buffers, Tensor(d!)[] momentum_buffer_absmaxes, "
      "Tensor(e!)[] param_extras, Tensor(f!)[] state_steps, *, Tensor lr, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool maximize, bool is_first_step, "
      "str param_mode, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Muon (math: fusedopt/reference.py::muon), in three ops around which the caller stacks and
  // slices (FSDP2 gathers the update between the first two). muon_momentum_: for each i,
  // momentum_buffers[i] = lerp(buf, grads[i], 1 - momentum) and updates[i] = the update to
  // orthogonalize (Nesterov or the buffer); updates are written only, shaped and typed like the
  // grads.
  m.def(
      "muon_momentum_(Tensor(a!)[] updates, Tensor[] grads, Tensor(b!)[] momentum_buffers, *, "
      "float momentum, bool nesterov) -> ()");
  // muon_momentum_lean_: muon_momentum_ with lean buffers (fusedopt/reference.py::
  // muon_momentum_lean): momentum_buffers in any float dtype, or uint8 8-bit blockwise codes
  // (signed) with their fp32 absmaxes (empty otherwise), as adam_lean_'s states.
  m.def(
      "muon_momentum_lean_(Tensor(a!)[] updates, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] momentum_buffer_absmaxes, *, float momentum, bool nesterov) -> ()");
  // newton_schulz: the Newton-Schulz orthogonalization of each matrix of x (batch, rows, cols),
  // len(coefficients) / 3 iterations of the flattened (a, b, c) triples, in dtype (accumulating in
  // fp32); returns (batch, rows, cols) in dtype. x is normalized by its Frobenius norm (at least
  // eps) first.
  m.def("newton_schulz(Tensor x, float[] coefficients, float eps, ScalarType dtype) -> Tensor");
  // muon_update_: params[i] = params[i] * (1 - lr * weight_decay) - adjusted_lr * orthogonalized[i]
  // (orthogonalized: contiguous, as many elements as the param, in the param's dtype or bf16 / fp32).
  m.def(
      "muon_update_(Tensor(a!)[] params, Tensor[] orthogonalized, *, float lr, "
      "float weight_decay, float adjusted_lr) -> ()");
  // LayerNorm (rms=false) or RMSNorm (rms=true) over the last dimension of a contiguous 2-D x
  // (rows, N), optionally after a fused residual add (math: fusedopt/reference.py::layer_norm,
  // rms_norm). Returns y (x's dtype); residual_out = x + residual (fp32 if residual_in_fp32, else
  // x's dtype; 0 elements without a residual); mean (fp32 (rows,), 0 elements for RMSNorm) and
  // rstd (fp32 (rows,)), saved for the backward pass. zero_centered_weight: y = x_hat * (1 + w).
  m.def(
      "norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms, "
      "bool zero_centered_weight, bool residual_in_fp32) -> (Tensor y, Tensor residual_out, "
      "Tensor mean, Tensor rstd)");
  // The backward of norm_fwd, recomputed from x (the normalized input: residual_out when there
  // was a residual) and the saved mean / rstd. dresidual_out, the grad reaching residual_out, is
  // added to dx. Returns dx (x's dtype), dweight and dbias (their params' dtypes; 0 elements when
  // absent), the latter two reduced over rows in fp32, deterministically.
  m.def(
      "norm_bwd(Tensor dy, Tensor? dresidual_out, Tensor x, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor rstd, bool rms, bool zero_centered_weight) -> (Tensor dx, "
      "Tensor dweight, Tensor dbias)");
  // Memory-bandwidth probe with an optimizer's access pattern: out[k] += src for every k,
  // split over threads exactly like the optimizer kernels. With three outs it moves 28 B/element,
  // the bytes of an fp32 AdamW step, so the two are directly comparable.
  m.def("stream_rmw_(Tensor(a!)[] outs, Tensor src) -> ()");
  // The bytes floor of an op that returns a fresh tensor (bench/bench_norm.py): a new tensor =
  // the sum of the inputs (one input: a copy), written as the norm kernels write their outputs.
  m.def("stream_sum(Tensor[] inputs) -> Tensor");
}

// fusedopt._C is imported only to load the library above; it defines no Python functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
