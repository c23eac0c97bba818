# bench/lib.sh: what bench/run and bench/tasks share.  Sourced, not run.
#
# The script sets `here` (the root of the tree) and `prog` (its name, for
# messages) before sourcing this file, and `port` and `workers` before
# bench_start_cluster.  In order, a script calls:
#
#   bench_prepare                          libpq environment, build, install
#   bench_start_cluster DIR SERVER_LOG     throwaway cluster, database bench
#                                          (bench/setup.sql) and pgb, engine up
#
# and then uses psql_db, q, engine_pids, diagnose, settle, pgbench_reference
# (or pgbench_init and pgbench_simple_update),
# server_log_problems, median, fmt0, fmt2, cells, round_heads, round_rules,
# machine_facts (and shm_pages, shm_touched) and bench_command.  The cluster is stopped
# and removed on exit, and its server log copied to
# bench/results/SERVER_LOG.

bindir=/usr/lib/postgresql/15/bin
export PG_CONFIG=${PG_CONFIG:-$bindir/pg_config}
results_dir=$here/bench/results

die() { echo "$prog: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*"; }

is_root=false
[ "$(id -u)" -eq 0 ] && is_root=true

# Run a PostgreSQL program as the postgres OS user when root.
as_pg() {
	if $is_root; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

# ---------------------------------------------------------------------------
# Build and install
# ---------------------------------------------------------------------------

# Sets git_rev: the source the figures belong to, the commit and a digest of
# any uncommitted changes, read just before building.
bench_prepare() {
	local v p

	# libpq settings of the caller must not redirect our connections.
	for v in $(compgen -e); do
		case $v in PG[A-Z]*) unset "$v" ;; esac
	done

	git_rev=$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)
	if [ "$git_rev" != unknown ] && [ -n "$(git -C "$here" status --porcelain -- src orchestrator--0.1.0.sql Makefile 2>/dev/null)" ]; then
		git_rev="$git_rev + uncommitted changes to src/, the SQL script or the Makefile (diff digest $(git -C "$here" diff HEAD -- src orchestrator--0.1.0.sql Makefile | sha1sum | cut -c 1-8))"
	fi
	$is_root || git_rev="$git_rev (tree of $prog; the installed build is not checked against it)"

	if $is_root; then
		log "installing dependencies, building and installing the extension"
		"$here/tools/install-deps"
		make -C "$here" -s PG_CONFIG="$PG_CONFIG" >/dev/null
		make -C "$here" -s PG_CONFIG="$PG_CONFIG" install >/dev/null
	else
		for p in initdb pg_ctl psql pgbench; do
			[ -x "$bindir/$p" ] || die "$bindir/$p is missing: install the packages listed in tools/install-deps"
		done
		[ -f "$("$PG_CONFIG" --pkglibdir)/orchestrator.so" ] &&
			[ -f "$("$PG_CONFIG" --sharedir)/extension/orchestrator.control" ] ||
			die "the extension is not installed: run 'make && sudo make install' (or this script as root)"
	fi
}

# ---------------------------------------------------------------------------
# The throwaway cluster
# ---------------------------------------------------------------------------
cluster=""
server_started=false
server_log_copy=server.log

huge_pages_restore=""	# vm.nr_hugepages to put back on exit, if changed

# The server's shared memory in huge pages, as a production server with
# shared buffers of gigabytes has it.  In pages of 4 kB, every process
# faults on each page of the shared buffers it touches for the first time
# (and the first to touch one has the kernel allocate and zero it, which on
# a virtual machine costs tens of microseconds): a benchmark of a few
# minutes on a new server then measures how fast its processes meet new
# buffers more than what they do with them, and a workload that writes
# more new pages (the audit trail) pays for it many times over.  As root,
# reserves what the cluster needs (PostgreSQL's
# shared_memory_size_in_huge_pages) and gives it back on exit; otherwise
# uses huge pages if enough are free.  Sets huge_pages (on or off) and
# shm_pages, which the results quote.
reserve_huge_pages() {
	local need free size
	huge_pages=off
	size=$(awk '/^Hugepagesize:/ { print $2 }' /proc/meminfo)
	need=$(as_pg "$bindir/postgres" -D "$cluster/data" -C shared_memory_size_in_huge_pages 2>/dev/null || echo -1)
	if [ -n "$size" ] && [[ $need =~ ^[0-9]+$ ]] && [ "$need" -gt 0 ]; then
		free=$(awk '/^HugePages_Free:/ { print $2 }' /proc/meminfo)
		if [ "$free" -lt "$need" ] && $is_root && [ -w /proc/sys/vm/nr_hugepages ]; then
			[ -n "$huge_pages_restore" ] || huge_pages_restore=$(cat /proc/sys/vm/nr_hugepages)
			echo $(( $(cat /proc/sys/vm/nr_hugepages) + need - free )) >/proc/sys/vm/nr_hugepages 2>/dev/null || true
			free=$(awk '/^HugePages_Free:/ { print $2 }' /proc/meminfo)
		fi
		[ "$free" -ge "$need" ] && huge_pages=on
	fi
	if [ "$huge_pages" = on ]; then
		shm_pages="shared memory in $need huge pages of $(( size / 1024 )) MB"
	else
		shm_pages="shared memory in pages of 4 kB (no huge pages to be had)"
		log "no huge pages to be had: the server's shared memory is in pages of 4 kB"
	fi
}

# Every shared buffer of the new server used once, as on a server that has
# run for a while.  The kernel zeroes a page of shared memory the first
# time a process touches it (with huge pages, 2 MB at once, while any
# other process touching the same page waits on it), and on a virtual
# machine the host may have to back it first.  On a new server the
# buffers nobody used yet go first to whoever needs a new one: a workload
# whose tables keep growing (the audit trail's) takes them, and pays the
# server's start-up cost, measurement after measurement, while one whose
# tables are emptied between measurements gets back buffers already
# touched.  In a profile of bench/audit's engine workers, 2.2% of the
# samples with the audit trail were such zeroing and the wait on it (none
# without).  An unlogged table of one page a row, as many rows as there
# are shared buffers and a few more, written and dropped: its buffers go
# back to the free list.  Sets shm_touched, which the results quote.
touch_shared_buffers() {
	local nbuffers
	nbuffers=$(q "SELECT setting FROM pg_settings WHERE name = 'shared_buffers'" postgres)
	psql_db postgres <<EOF
CREATE UNLOGGED TABLE bench_touch (page text);
ALTER TABLE bench_touch ALTER page SET STORAGE PLAIN;
INSERT INTO bench_touch SELECT repeat('x', 7000) FROM generate_series(1, $nbuffers + 1000);
DROP TABLE bench_touch;
EOF
	shm_touched="each of its $nbuffers shared buffers used once before the measurements"
}

# Is a postmaster of a previous run still alive in this data directory?
live_postmaster() {
	local pidfile=$1/data/postmaster.pid pid
	[ -f "$pidfile" ] || return 1
	pid=$(head -n 1 "$pidfile" 2>/dev/null || true)
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	[ "$(ps -o comm= -p "$pid" 2>/dev/null || true)" = postgres ]
}

# $1 when the user running the server can use it and its socket path is
# short enough (108 bytes for a unix socket), else a new /tmp dir.
choose_cluster_dir() {
	local d=$1
	if [ -e "$d" ]; then
		if live_postmaster "$d"; then
			die "a server is still running in $d (pid $(head -n 1 "$d/data/postmaster.pid")); stop it with: $bindir/pg_ctl -D $d/data stop"
		fi
		rm -rf "$d"
	fi
	if [ $(( ${#d} + 20 )) -le 107 ] && mkdir "$d" 2>/dev/null; then
		$is_root && chown postgres: "$d"
		if as_pg test -w "$d" -a -x "$d"; then
			cluster=$d
			return
		fi
		rm -rf "$d"
	fi
	cluster=$(mktemp -d /tmp/orchestrator-bench.XXXXXX)
	$is_root && chown postgres: "$cluster"
	return 0
}

cleanup() {
	local status=$?
	set +e
	trap - EXIT INT TERM
	# a script's own clean-up first (background sessions)
	declare -F bench_cleanup_hook >/dev/null && bench_cleanup_hook
	if [ -n "$cluster" ] && [ -d "$cluster" ]; then
		if [ -f "$cluster/server.log" ]; then
			mkdir -p "$results_dir" 2>/dev/null && cp "$cluster/server.log" "$results_dir/$server_log_copy" 2>/dev/null
			if [ "$status" -ne 0 ]; then
				echo "--- last lines of the server log (all of it: bench/results/$server_log_copy)" >&2
				tail -n 30 "$cluster/server.log" >&2
			fi
		fi
		if $server_started; then
			as_pg "$bindir/pg_ctl" -D "$cluster/data" -m fast -w -t 60 stop >/dev/null 2>&1 ||
				as_pg "$bindir/pg_ctl" -D "$cluster/data" -m immediate -w -t 60 stop >/dev/null 2>&1
		fi
		rm -rf "$cluster"
	fi
	[ -n "$huge_pages_restore" ] && echo "$huge_pages_restore" >/proc/sys/vm/nr_hugepages 2>/dev/null
	[ "$status" -ne 0 ] && echo "$prog: FAILED (exit status $status)" >&2
	exit "$status"
}

psql_db() {
	local db=$1
	shift
	as_pg "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$sock" -p "$port" -d "$db" "$@"
}
# One query's result, unaligned, no headers.
q() { psql_db "${2:-bench}" -At -c "$1"; }

engine_pids() {
	q "SELECT coalesce(string_agg(pid::text, ',' ORDER BY pid), '') FROM orch.engine_workers WHERE database = 'bench'"
}

# Start the cluster in $1 (or a /tmp dir), with databases bench (set up by
# bench/setup.sql) and pgb; return once the engine workers of bench run.
# Sets cluster, sock, max_worker_processes, pg_version, batch_size,
# max_sleep; the server log goes to bench/results/$2 on exit.
bench_start_cluster() {
	local n settings
	server_log_copy=$2
	trap cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	choose_cluster_dir "$1"
	cd "$cluster"		# a directory the postgres OS user may enter
	sock=$cluster

	max_worker_processes=16
	# the launcher; workers and a sealer for each of up to three databases
	# (bench/audit's); probes of "postgres" and "pgb"
	[ $(( 3 * (workers + 1) + 3 )) -gt $max_worker_processes ] && max_worker_processes=$(( 3 * (workers + 1) + 3 ))

	log "creating the cluster in $cluster (port $port)"
	as_pg "$bindir/initdb" -D "$cluster/data" -A trust -E UTF8 --locale=C -N >/dev/null
	# Settings for a 2-core, 24 GiB machine.  synchronous_commit stays on (the
	# default): every engine batch and every pgbench transaction waits for its
	# WAL flush.  track_commit_timestamp serves the measurements that time
	# the engine's commits.
	settings=$(cat <<EOF
listen_addresses = ''
unix_socket_directories = '$sock'
port = $port
max_connections = 50
shared_preload_libraries = 'orchestrator'
orchestrator.workers_per_database = $workers
max_worker_processes = $max_worker_processes
shared_buffers = 1GB
effective_cache_size = 16GB
work_mem = 16MB
maintenance_work_mem = 256MB
wal_buffers = 16MB
max_wal_size = 4GB
min_wal_size = 1GB
checkpoint_timeout = 15min
checkpoint_completion_target = 0.9
synchronous_commit = on
track_commit_timestamp = on
log_checkpoints = on
log_line_prefix = '%m [%p] %b: '
EOF
	)
	as_pg tee -a "$cluster/data/postgresql.conf" >/dev/null <<<"$settings"
	reserve_huge_pages
	as_pg tee -a "$cluster/data/postgresql.conf" >/dev/null <<<"huge_pages = $huge_pages"
	as_pg "$bindir/pg_ctl" -D "$cluster/data" -l "$cluster/server.log" -w -t 120 start >/dev/null
	server_started=true
	log "using each shared buffer once"
	touch_shared_buffers

	q "CREATE DATABASE bench" postgres
	q "CREATE DATABASE pgb" postgres
	psql_db bench <"$here/bench/setup.sql" >/dev/null

	# Every query below runs on this server; what it reports about itself.
	pg_version=$(q "SHOW server_version")
	batch_size=$(q "SHOW orchestrator.batch_size")
	max_sleep=$(q "SHOW orchestrator.max_sleep")

	# The launcher starts the engine workers once CREATE EXTENSION commits.
	for _ in $(seq 1 300); do
		n=$(q "SELECT count(*) FROM orch.engine_workers WHERE database = 'bench'")
		[ "$n" -eq "$workers" ] && break
		sleep 0.1
	done
	[ "$n" -eq "$workers" ] ||
		die "expected $workers engine workers for database bench after 30 s, found $n"
	log "server up: PostgreSQL $pg_version, $workers engine workers ($(engine_pids))"
}

# What to look at when something goes wrong in the engine.
diagnose() {
	echo "--- runs by status" >&2
	q "SELECT status, count(*) FROM orch.runs GROUP BY 1 ORDER BY 1" >&2 || true
	echo "--- steps by name and status" >&2
	q "SELECT name, status, count(*) FROM orch.steps GROUP BY 1, 2 ORDER BY 1, 2" >&2 || true
	echo "--- attempts by outcome" >&2
	q "SELECT outcome, sqlstate, message, count(*) FROM orch.attempts GROUP BY 1, 2, 3 ORDER BY 1" >&2 || true
	echo "--- engine workers" >&2
	q "SELECT * FROM orch.engine_workers" >&2 || true
	echo "--- sessions" >&2
	q "SELECT pid, backend_type, state, wait_event_type, wait_event, now() - xact_start AS in_xact,
	          backend_xmin, left(query, 60)
	     FROM pg_stat_activity WHERE datname = 'bench'" >&2 || true
	# Where the engine workers are, if gdb is there to tell.
	if command -v gdb >/dev/null; then
		local pid
		for pid in $(q "SELECT pid FROM orch.engine_workers" 2>/dev/null); do
			echo "--- stack of engine worker $pid" >&2
			timeout 20 gdb -p "$pid" -batch -ex bt 2>/dev/null | grep -E '^#' | head -30 >&2 || true
		done
	fi
}

# Checkpoint and settle before a measurement, so that none starts mid-way.
settle() {
	q "VACUUM ANALYZE orch.steps, orch.runs, orch.attempts" >/dev/null
	q "CHECKPOINT" >/dev/null
}

# Warnings and errors in the server log: prints their count, and the first
# 20 of them to stderr.
server_log_problems() {
	local n
	n=$(grep -cE '(ERROR|FATAL|PANIC|WARNING):' "$cluster/server.log" || true)
	if [ "$n" -gt 0 ]; then
		echo "--- warnings and errors in the server log (all of it: bench/results/$server_log_copy)" >&2
		grep -E '(ERROR|FATAL|PANIC|WARNING):' "$cluster/server.log" | head -n 20 >&2
	fi
	echo "$n"
}

# ---------------------------------------------------------------------------
# Figures and the summary
# ---------------------------------------------------------------------------
median() {
	printf '%s\n' "$@" | sort -g |
		awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
fmt0() { printf '%.0f' "$1"; }
fmt2() { printf '%.2f' "$1"; }

cells() {	# one table cell per round, formatted by $1
	local f=$1 v
	shift
	for v in "$@"; do printf ' %s |' "$($f "$v")"; done
}
round_heads() { for i in $(seq 1 "$1"); do printf ' round %s |' "$i"; done; }
round_rules() { for _ in $(seq 1 "$1"); do printf -- ' ---: |'; done; }

# The command line, with the settings given in the environment: $1 the
# command, then the names of the variables in the reverse of their order.
bench_command() {
	local c=$1 v
	shift
	for v in "$@"; do
		[ -n "${!v:-}" ] && c="$v=${!v} $c"
	done
	echo "$c"
}

# Sets run_as, cpu_model, mem_gib, os_name, fs_type.
machine_facts() {
	run_as=$($is_root && echo root || echo "user $(id -un)")
	cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
	mem_gib=$(awk '/^MemTotal:/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
	os_name=$(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-unknown}" || echo unknown)
	fs_type=$(df -PT "$cluster" | awk 'NR == 2 { print $2 }')
}

# The reference: pgbench -i -s $pgb_scale into database pgb
# (pgbench_init), then a CHECKPOINT and pgbench -b simple-update
# -c $pgb_clients -j $pgb_threads -T $pgb_secs (pgbench_simple_update).
# Each sets tps (without initial connection time); $1 names the
# measurement in messages.
pgbench_init() {
	local what=$1 out
	if ! out=$(as_pg "$bindir/pgbench" -h "$sock" -p "$port" -i -s "$pgb_scale" -q pgb 2>&1); then
		echo "$out" >&2
		die "$what: pgbench -i failed"
	fi
}
pgbench_simple_update() {
	local what=$1 out failed_tx
	q "CHECKPOINT" >/dev/null
	if ! out=$(as_pg "$bindir/pgbench" -h "$sock" -p "$port" -b simple-update \
		-c "$pgb_clients" -j "$pgb_threads" -T "$pgb_secs" pgb 2>&1); then
		echo "$out" >&2
		die "$what: pgbench failed"
	fi
	tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' <<<"$out")
	[ -n "$tps" ] || { echo "$out" >&2; die "$what: no tps in pgbench's output"; }
	failed_tx=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")
	[ "${failed_tx:-0}" -eq 0 ] || { echo "$out" >&2; die "$what: $failed_tx pgbench transactions failed"; }
}
pgbench_reference() {
	pgbench_init "$1"
	pgbench_simple_update "$1"
}
