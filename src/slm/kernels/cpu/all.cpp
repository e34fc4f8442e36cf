// Every kernel in one translation unit: kernels/__init__.py compiles this file alone (the torch
// headers, most of the build's time, are then parsed once).
#include "matvec_int8.cpp"
#include "matvec_int4.cpp"
#include "matvec_gguf.cpp"
#include "matvec_f32.cpp"
#include "norm_rope.cpp"
#include "gelu.cpp"
#include "argmax.cpp"
#include "sample.cpp"
#include "attention.cpp"
#include "train.cpp"
#include "decoder.cpp"
#include "register.cpp"
