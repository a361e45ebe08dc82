// Seed program for the `elf` fuzz target: C++ names (namespaces, templates, a class with a
// const method, an operator) for the Itanium demangler, with DWARF.
#include <cstdio>

namespace demo {
template <typename T> struct Box {
	T value;
	__attribute__((noinline)) T get() const { return value; }
	__attribute__((noinline)) Box operator+(const Box &other) const { return Box{value + other.value}; }
};

template <typename T> __attribute__((noinline)) T twice(T v)
{
	return v + v;
}
} // namespace demo

int main(int argc, char **)
{
	demo::Box<int> a{argc}, b{2};
	std::printf("%d %ld\n", (a + b).get(), demo::twice<long>(argc));
	return 0;
}
