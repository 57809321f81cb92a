/*
 * fixture_nosym.c - a shared object that is not an occamy plugin: it has no
 * occamy_plugin symbol.
 */
int fixture_nosym_answer(void);

int
fixture_nosym_answer(void)
{
	return 42;
}
