/* doctest entry point: every test file in tests/ links into one runner (build/test_moe). */
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
