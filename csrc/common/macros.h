// Portability macros shared by every kernel header.
//
// <op>.h files hold the arithmetic both backends run. Marking a function
// PYVQ_HOST_DEVICE makes it callable from the CPU launcher (plain C++) and
// from CUDA kernels (nvcc), so the CPU tests exercise the exact math the GPU
// runs. Keep ATen out of those headers: pointers, sizes and scalars only.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PYVQ_HOST_DEVICE __host__ __device__ __forceinline__
#define PYVQ_DEVICE __device__ __forceinline__
#else
#define PYVQ_HOST_DEVICE inline
#define PYVQ_DEVICE inline
#endif

#if defined(__CUDA_ARCH__)
#define PYVQ_ON_DEVICE 1
#else
#define PYVQ_ON_DEVICE 0
#endif
