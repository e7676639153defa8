// Activation functions, in f32.

// erfc(z) for z >= 0 (Abramowitz & Stegun 7.1.26, absolute error below 1.5e-7). Using erfc on
// the side where 1 + erf would cancel keeps GELU accurate for negative inputs.
float erfc_pos(float z) {
  const float t = 1.0 / (1.0 + 0.3275911 * z);
  const float poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
  return poly * exp(-z * z);
}

// Exact GELU: 0.5 x (1 + erf(x / sqrt(2))).
float gelu_erf(float x) {
  const float z = abs(x) * 0.70710678118654752;
  const float c = erfc_pos(z);
  return x >= 0.0 ? 0.5 * x * (2.0 - c) : 0.5 * x * c;
}

// GELU, tanh approximation (gelu_pytorch_tanh).
float gelu_tanh(float x) {
  const float u = clamp(0.7978845608028654 * (x + 0.044715 * x * x * x), -15.0, 15.0);
  return 0.5 * x * (1.0 + tanh(u));
}

float quick_gelu(float x) { return x / (1.0 + exp(-1.702 * x)); }

float silu(float x) { return x / (1.0 + exp(-x)); }
