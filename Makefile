# orchestrator: PGXS build.
#
#   make && make install      build and install into the pg_config on PATH
#   make test                 the whole suite (see test/run-all), as in .ci/run
#
# LLVM bitcode is not built (with_llvm = no): the JIT would only inline the
# extension's C functions into expressions, which buys nothing here, and
# building bitcode needs clang, which a fresh machine may not have.

EXTENSION    = orchestrator
MODULE_big   = orchestrator
OBJS         = src/orchestrator.o src/shmem.o src/wakeup.o src/launcher.o \
               src/engine.o src/steps.o src/api_wait.o src/api_tasks.o \
               src/audit.o src/audit_seal.o src/uuid_v7.o src/rowfetch.o \
               src/rowwrite.o src/jsonschema.o
DATA         = orchestrator--0.1.0.sql
PG_CPPFLAGS  = -I$(srcdir)/src
PG_CFLAGS    = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers
# SHA-256 of the audit trail (OpenSSL 3) and the compression of its records
# (LZ4); PostgreSQL itself links both
SHLIB_LINK   = -lcrypto -llz4

REGRESS      = setup define_workflow runs engine retry tasks circuits routing quarantine audit human events validation approvals subworkflow
REGRESS_OPTS = --temp-instance=./tmp_regress --temp-config=$(srcdir)/test/regress.conf

ISOLATION      = start_run_idempotency claim_race cancel_vs_complete task_lease cancel_vs_failure complete_tasks resolve_race event_race approval_race complete_and_claim
ISOLATION_OPTS = --temp-instance=./tmp_isolation --temp-config=$(srcdir)/test/isolation.conf \
                 --inputdir=$(srcdir)/test/isolation --outputdir=output_iso

TAP_TESTS    = 1
PROVE_TESTS  = test/t/*.pl

PG_CONFIG   ?= pg_config
PGXS        := $(shell $(PG_CONFIG) --pgxs)
# Set before the include: an override wins over Makefile.global's value.
override with_llvm = no
include $(PGXS)


# PGXS tracks no header dependencies: every object depends on the shared header.
$(OBJS): src/orchestrator.h
src/audit.o src/audit_seal.o src/orchestrator.o src/engine.o src/steps.o: src/audit.h

.PHONY: test demo bench
test:
	test/run-all
demo:
	demo/run
bench:
	bench/run
