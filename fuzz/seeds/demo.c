/* Seed program for the `elf` and `dwarf` fuzz targets: a few functions, one recursive, some
 * inlined (from this file and from demo.h), so the DWARF has subprograms, inlined
 * subroutines, call files and lines, ranges and a two-file line table. Built by
 * `cargo xtask fuzz-seeds` (see docs/fuzzing.md). */
#include <stdio.h>
#include <stdlib.h>
#include "demo.h"

struct point {
	int x, y;
};

static inline int square(int v)
{
	return v * v;
}

static int __attribute__((noinline)) distance2(const struct point *p)
{
	return square(p->x) + square(p->y);
}

int __attribute__((noinline)) fib(int n)
{
	return n < 2 ? n : fib(n - 1) + fib(n - 2);
}

/* Rust-mangled names (legacy and v0), so the symbol table feeds both Rust demanglers. */
int rust_legacy(int x) __asm__("_ZN4demo6legacy17h0123456789abcdefE");
int rust_v0(int x) __asm__("_RNvCs6xxl1lAjzDf_4demo2v0");

int __attribute__((noinline)) rust_legacy(int x)
{
	return x + 1;
}

int __attribute__((noinline)) rust_v0(int x)
{
	return x + 2;
}

int main(int argc, char **argv)
{
	struct point p = { argc, argc > 1 ? atoi(argv[1]) : 3 };
	printf("%d %d %d\n", scale(distance2(&p), 3), fib(p.y), rust_legacy(argc) + rust_v0(argc));
	return 0;
}
