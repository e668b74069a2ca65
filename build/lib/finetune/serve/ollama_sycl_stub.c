/* Stand-in for libollama-ggml-sycl.so from PyPI bigdl-core-cpp 2.6.0 (Intel's Ollama 0.5.4 fork).
 * The real library needs oneAPI (libsycl.so.8, MKL, ~2.6 GB) and aborts without an Intel GPU.
 * ggml asks each backend for its registry: returning NULL from ggml_backend_sycl_reg() makes it
 * skip SYCL, so only the CPU backend loads. The other functions exist because the Ollama libraries
 * link against them (found with `nm -D --undefined-only`), so they must resolve at load time.
 * Run the server with OLLAMA_NUM_GPU=0 as well, or the fork still builds SYCL-only graph ops that the
 * CPU backend skips (garbage answers). Build: gcc -shared -fPIC -O2 -o libollama-ggml-sycl.so <this file>
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *ggml_backend_sycl_reg(void) { return NULL; }

void *ggml_backend_sycl_init(int device) {
    (void)device;
    return NULL;
}

/* Intel fork extension: returns the device's name string. */
const char *ggml_backend_sycl_get_device_name(int device) {
    (void)device;
    return "";
}

bool ggml_backend_is_sycl(void *backend) {
    (void)backend;
    return false;
}

int ggml_backend_sycl_get_device_count(void) { return 0; }

void *ggml_backend_sycl_buffer_type(int device) {
    (void)device;
    return NULL;
}

void *ggml_backend_sycl_split_buffer_type(const float *tensor_split) {
    (void)tensor_split;
    return NULL;
}

void *ggml_backend_sycl_host_buffer_type(void) { return NULL; }

void ggml_backend_sycl_print_sycl_devices(void) {}

void ggml_backend_sycl_get_gpu_list(int *id_list, int max_len) {
    for (int i = 0; i < max_len; i++) id_list[i] = -1;
}

void ggml_backend_sycl_get_device_description(int device, char *description, size_t description_size) {
    (void)device;
    if (description_size > 0) description[0] = '\0';
}

void ggml_backend_sycl_get_device_memory(int device, size_t *free, size_t *total) {
    (void)device;
    *free = 0;
    *total = 0;
}

/* C++ `void ggml_format_convert_to_xpu(const void *src, void *dst, size_t n, int qtype)`, imported by
 * libollama_llama.so under its mangled name. The fork's loader (convert_ggml_tensor, read from its
 * disassembly) converts Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K weights into a fresh buffer with it (n = element
 * count) and uploads that buffer, so a no-op would load uninitialised memory: keep the layout, copy.
 * With OLLAMA_NUM_GPU=0 it was never called in our runs; this is the safe answer if it ever is. */
void ggml_format_convert_to_xpu(const void *src, void *dst, size_t n, int qtype)
    __asm__("_Z26ggml_format_convert_to_xpuPKvPvmi");
void ggml_format_convert_to_xpu(const void *src, void *dst, size_t n, int qtype) {
    size_t block = 0, bytes = 0; /* ggml block size (elements) and its size in bytes */
    switch (qtype) {
    case 2: block = 32; bytes = 18; break;   /* Q4_0 */
    case 3: block = 32; bytes = 20; break;   /* Q4_1 */
    case 8: block = 32; bytes = 34; break;   /* Q8_0 */
    case 12: block = 256; bytes = 144; break; /* Q4_K */
    case 13: block = 256; bytes = 176; break; /* Q5_K */
    case 14: block = 256; bytes = 210; break; /* Q6_K */
    default:
        fprintf(stderr, "ollama-sycl-stub: unexpected ggml type %d in ggml_format_convert_to_xpu\n", qtype);
        abort();
    }
    memcpy(dst, src, n / block * bytes);
}
