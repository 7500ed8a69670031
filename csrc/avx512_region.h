// Functions compiled for AVX-512 (F and VL) inside a translation unit built for baseline x86-64, run only
// where the CPU has it (cpu_has_avx512()): the pixel tiles' pair kernel (pixel_tiles.cpp) and the orbit
// products (orbit_products.cpp) open such a region with EQUIPROJ_AVX512_BEGIN and close it with
// EQUIPROJ_AVX512_END. EQUIPROJ_AVX512_X86 is defined where such regions can be compiled (GCC or clang on
// x86-64), and <immintrin.h> is then included.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define EQUIPROJ_AVX512_X86 1
#include <immintrin.h>

#ifdef __clang__
#define EQUIPROJ_AVX512_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512vl\"))), apply_to = function)")
#define EQUIPROJ_AVX512_END _Pragma("clang attribute pop")
#else
// GCC 12's AVX-512 headers leave the unused source of some masked conversions undefined on purpose
#define EQUIPROJ_AVX512_BEGIN                                                                   \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512vl\")") _Pragma("GCC diagnostic push") \
      _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")                                     \
          _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define EQUIPROJ_AVX512_END _Pragma("GCC diagnostic pop") _Pragma("GCC pop_options")
#endif

namespace equiproj_cpu {

// Whether the CPU runs AVX-512 F and VL.
inline bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
}

}  // namespace equiproj_cpu
#endif
