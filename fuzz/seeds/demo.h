/* Inlined from a second file, so the line table and DW_AT_call_file name two files. */
static inline int scale(int x, int by)
{
	return x * by + 1;
}
