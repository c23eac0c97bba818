# The audit trail on a real server.  Tampering as a superuser (an event
# modified, a record deleted, a record forged, the newest blocks dropped) is
# reported exactly, by orch.verify_audit and by the independent verifier
# (tools/verify-audit), which agree; kill -9 in the middle of a seal leaves
# a chain that goes on and verifies; the sealer seals on its own, in a
# process of its own that a long step does not hold back.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use OrchTest;

# The test decides where blocks end (orch.seal_audit), until the crash part.
my $node = orch_node('audit', conf => qq{
orchestrator.audit_seal_interval = '1h'
orchestrator.audit_heartbeat = '1d'
restart_after_crash = on
});
orch_install_app($node, 'postgres');
my $verifier = "$FindBin::RealBin/../../tools/verify-audit";

# Findings as "block audit_id finding" lines, sorted as the verifier sorts.
sub findings
{
	my ($db, $digest) = @_;
	my $arg = defined $digest ? "'$digest'::jsonb" : 'NULL';
	return $node->safe_psql($db, qq{
		SELECT coalesce(block_id::text, '') || ' ' || coalesce(audit_id::text, '') || ' ' || finding
		  FROM orch.verify_audit($arg) ORDER BY finding, block_id NULLS FIRST, audit_id NULLS FIRST});
}

sub independent
{
	my ($db, $digest) = @_;
	my @cmd = ($verifier);
	push @cmd, '--digest', $digest if defined $digest;
	push @cmd, $node->connstr($db);
	my ($out, $err) = ('', '');
	IPC::Run::run(\@cmd, '>', \$out, '2>', \$err);
	my $rc = $? >> 8;
	my @lines = map { my @f = split /\t/, $_, -1; "$f[0] $f[1] $f[2]" } grep { length } split /\n/, $out;
	return ($rc, join("\n", @lines), $err);
}

sub seal { return $node->safe_psql('postgres', "SELECT orch.seal_audit($_[0])"); }

# Block A: changes to an audited business table, numbers, text and JSON.
$node->safe_psql('postgres', q{
CREATE TABLE app.accounts (id int PRIMARY KEY, owner text, balance numeric, note jsonb,
						   opened timestamptz DEFAULT '2026-01-01 12:00+02');
SELECT orch.enable_audit('app.accounts');
INSERT INTO app.accounts (id, owner, balance, note)
SELECT g, 'owner "' || g || E'" \u00fc\\n', g * 10.5,
	   jsonb_build_object('n', g, 'tags', ARRAY['a', 'b'], 'x', 1.50, 'nested', jsonb_build_object('ok', g % 2 = 0, 'none', NULL))
  FROM generate_series(1, 50) g;
UPDATE app.accounts SET balance = balance + 1 WHERE id % 5 = 0;
DELETE FROM app.accounts WHERE id > 45;
});
ok(seal('false') > 0, 'block A sealed');

# Block B: runs of a workflow, whose engine writes the orchestrator's tables.
$node->safe_psql('postgres', "SELECT orch.start_run('chain3') FROM generate_series(1, 20)");
$node->poll_query_until('postgres', "SELECT count(*) = 20 FROM orch.runs WHERE status = 'succeeded'")
  or die 'runs did not finish';
ok(seal('false') > 0, 'block B sealed');

# Block C: more changes; block D: a heartbeat.
$node->safe_psql('postgres', "UPDATE app.accounts SET owner = upper(owner)");
ok(seal('false') > 0, 'block C sealed');
is(seal('true'), '0', 'block D: a heartbeat');

my $blocks = $node->safe_psql('postgres', q{SELECT count(*) || ' ' || max(block_id) FROM orch.audit_blocks});
my ($nblocks, $last) = split / /, $blocks;
is($nblocks, $last, 'the blocks are numbered without a gap');

is(findings('postgres'), '', 'the intact trail has no findings');
my ($rc, $out, $err) = independent('postgres');
is($rc, 0, 'the independent verifier finds nothing either') or diag($out, $err);
my $a_run = $node->safe_psql('postgres', 'SELECT run_id FROM orch.runs LIMIT 1');
is($node->safe_psql('postgres', "SELECT count(*) FROM orch.verify_run('$a_run')"), '0',
	'a run verifies');

my $digest = $node->safe_psql('postgres', 'SELECT orch.audit_digest()');

# Tamper as a superuser, with the append-only triggers out of the way: one
# event of the first UPDATE of app.accounts (a number in its new row), the
# record of its DELETE (five events), two records forged into the block of
# its INSERT (one with an event that claims a run, one that claims to hold
# no events), and the run_ids of a record.  Each is looked up with its
# block, since the sealer may have split block A's statements
# over several blocks.
my $in_block = q{(SELECT b.block_id FROM orch.audit_blocks b
				   WHERE l.xid >= b.xid_from AND l.xid < b.xid_to)};
my ($block_m, $modified, $modified_record) = split /\|/, $node->safe_psql('postgres', qq{
	SELECT $in_block, l.audit_id, l.record_id FROM orch.audit_log l
	 WHERE l.table_name = 'app.accounts' AND l.operation = 'UPDATE' AND l.row_key = '{"id": 5}'
	 ORDER BY l.audit_id LIMIT 1});
my @deleted = split /\n/, $node->safe_psql('postgres', qq{
	SELECT $in_block || ' ' || l.audit_id FROM orch.audit_log l
	 WHERE l.table_name = 'app.accounts' AND l.operation = 'DELETE' ORDER BY l.audit_id});
is(scalar(@deleted), 5, 'the DELETE recorded five events');
my ($deleted_record) = $node->safe_psql('postgres', q{
	SELECT DISTINCT record_id FROM orch.audit_log WHERE table_name = 'app.accounts' AND operation = 'DELETE'});
my ($block_a, $forged_xid) = split /\|/, $node->safe_psql('postgres', qq{
	SELECT $in_block, l.xid FROM orch.audit_log l
	 WHERE l.table_name = 'app.accounts' AND l.operation = 'INSERT' ORDER BY l.audit_id LIMIT 1});
# and the run_ids of a record of block B, which hides its events from
# verify_run, and the purge flag of another, which makes a purge up (each
# reported at the record's first event)
my ($block_r, $runs_record, $runs_event) = split /\|/, $node->safe_psql('postgres', qq{
	SELECT $in_block, l.record_id, l.record_id * 1000 FROM orch.audit_log l
	 WHERE l.table_name = 'orch.steps' ORDER BY l.record_id LIMIT 1});
my ($block_p, $purge_record, $purge_event) = split /\|/, $node->safe_psql('postgres', qq{
	SELECT $in_block, l.record_id, l.record_id * 1000 FROM orch.audit_log l
	 WHERE l.table_name = 'orch.runs' AND l.record_id <> $runs_record AND $in_block = $block_r
	 ORDER BY l.record_id DESC LIMIT 1});
my ($block_c, $block_d) = ($last - 1, $last);
$node->safe_psql('postgres', qq{
ALTER TABLE orch.audit_records DISABLE TRIGGER audit_records_append_only;
ALTER TABLE orch.audit_blocks DISABLE TRIGGER audit_blocks_append_only;
-- the balance 53.5 becomes 99.5 in the new row of the event of id 5
UPDATE orch.audit_records
   SET events = overlay(events placing convert_to('99.5', 'UTF8')
						from position(convert_to('53.5', 'UTF8') in events))
 WHERE record_id = $modified_record;
DELETE FROM orch.audit_records WHERE record_id = $deleted_record;
UPDATE orch.audit_records SET run_ids = NULL WHERE record_id = $runs_record;
UPDATE orch.audit_records SET purge = true WHERE record_id = $purge_record;
-- a statement inserting into app.accounts as postgres, with one event
-- that claims a run
INSERT INTO orch.audit_records (record_id, xid, at, n_events, events, hashes, run_ids)
	OVERRIDING SYSTEM VALUE
	VALUES (999999, '$forged_xid', now(), 1,
			'\\x0100000008'::bytea || int8send(0) || '\\x010000000c'::bytea
			|| convert_to('app.accounts', 'UTF8') || '\\x0100000006'::bytea || convert_to('INSERT', 'UTF8')
			|| '\\x000100000008'::bytea || convert_to('postgres', 'UTF8')
			|| '\\x0100000008'::bytea || convert_to('postgres', 'UTF8') || '\\x0000000001'::bytea
			|| '\\x000000'::bytea || '\\x0100000010'::bytea || uuid_send('$a_run') || '\\x00'::bytea,
			decode(repeat('00', 32), 'hex'), ARRAY['$a_run'::uuid]),
		   (999998, '$forged_xid', now(), 0, '', '', NULL);
DELETE FROM orch.audit_blocks WHERE block_id >= $block_c;
ALTER TABLE orch.audit_records ENABLE ALWAYS TRIGGER audit_records_append_only;
ALTER TABLE orch.audit_blocks ENABLE ALWAYS TRIGGER audit_blocks_append_only;
});

my $expected = join("\n",
	(map { "$_ deleted row" } @deleted),
	"$block_a 999998000 forged row",
	"$block_a 999999000 forged row",
	"$block_c  missing block",
	"$block_d  missing block",
	"$block_m $modified modified row",
	"$block_r $runs_event modified row",
	"$block_p $purge_event modified row");
is(findings('postgres', $digest), $expected,
	'verify_audit reports each change, naming its block and row');
($rc, $out, $err) = independent('postgres', $digest);
is($rc, 1, 'the independent verifier reports findings') or diag($err);
is($out, $expected, 'the independent verifier reports exactly the same');
is($node->safe_psql('postgres', qq{
	SELECT coalesce(block_id::text, '') || ' ' || audit_id || ' ' || finding
	  FROM orch.verify_run('$a_run')}),
	"$block_a 999999000 forged row", 'verify_run finds the row forged into the run');
# Without the digest the dropped tail cannot be seen: the chain is shorter, not broken.
is(findings('postgres'),
	join("\n", (map { "$_ deleted row" } @deleted), "$block_a 999998000 forged row",
		 "$block_a 999999000 forged row",
		 "$block_m $modified modified row", "$block_r $runs_event modified row",
		 "$block_p $purge_event modified row"),
	'without the exported digest, a dropped tail is not a finding');
# A digest naming a block far beyond the chain's end (forged, or garbage):
# the first 1,000 absent blocks one by one, then one finding for the rest.
my $far = '{"block_id": 9000000000000000000, "block_hash": "' . ('ab' x 32) . '"}';
is($node->safe_psql('postgres', qq{
	SELECT count(*) || ' ' || min(block_id) || ' ' || max(block_id)
	  FROM orch.verify_audit('$far') WHERE finding = 'missing block'}),
	'1001 ' . $block_c . ' ' . ($block_c + 1000),
	'a digest far beyond the chain: 1,001 findings, not billions');
($rc, $out, $err) = independent('postgres', $far);
my @far_missing = map { (split / /)[0] } grep { / missing block$/ } split /\n/, $out;
is(scalar(@far_missing) . ' ' . $far_missing[0] . ' ' . $far_missing[-1],
	'1001 ' . $block_c . ' ' . ($block_c + 1000),
	'the independent verifier bounds them the same way') or diag($err);
($rc, $out, $err) = independent('postgres', '{"block_id": 0, "block_hash": "' . ('ab' x 32) . '"}');
is($rc, 2, 'the independent verifier refuses a digest whose block_id is no block number');
($rc, $out, $err) = independent('postgres', '{"block_id": 1, "block_hash": " f' . ('ab' x 31) . '"}');
is($rc, 2, 'and one whose block_hash is not 64 hexadecimal digits');

# A broken link: a block rewritten consistently in itself, but not its successor.
$node->safe_psql('postgres', qq{
ALTER TABLE orch.audit_blocks DISABLE TRIGGER audit_blocks_append_only;
UPDATE orch.audit_blocks SET prev_hash = decode(repeat('11', 32), 'hex') WHERE block_id = $block_a + 1;
ALTER TABLE orch.audit_blocks ENABLE ALWAYS TRIGGER audit_blocks_append_only;
});
like(findings('postgres'), qr/^@{[$block_a + 1]}  broken link$/m, 'a broken link is reported');
like((independent('postgres'))[1], qr/^@{[$block_a + 1]}  broken link$/m,
	'and the independent verifier reports it too');

# ------------------------------------------------------------------------
# kill -9 in the middle of a seal, in a database of its own
# ------------------------------------------------------------------------
$node->safe_psql('postgres', 'CREATE DATABASE crashdb');
$node->safe_psql('crashdb', q{
CREATE EXTENSION orchestrator;
CREATE TABLE big (id int PRIMARY KEY, payload text);
SELECT orch.enable_audit('big');
CREATE FUNCTION sealer_pid() RETURNS int LANGUAGE plpgsql AS $$
BEGIN
	FOR i IN 1 .. 60000 LOOP
		PERFORM pg_stat_clear_snapshot();
		IF EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database()
					AND query = 'orchestrator: sealing the audit trail' AND state = 'active') THEN
			RETURN (SELECT pid FROM pg_stat_activity WHERE datname = current_database()
					 AND query = 'orchestrator: sealing the audit trail' AND state = 'active' LIMIT 1);
		END IF;
		PERFORM pg_sleep(0.001);
	END LOOP;
	RETURN NULL;
END
$$;
});
$node->poll_query_until('crashdb',
	"SELECT count(*) > 0 FROM orch.engine_workers WHERE database = current_database()")
  or die 'no engine in crashdb';
# Many rows in one transaction: a seal that takes a while (a few hundred
# milliseconds).  The sealer seals them only when told (a change of the
# interval makes it seal at once), so that the seal caught is theirs.  A
# kill that lands after the seal's commit finds a seal that is over: the
# round is tried again, with more rows, up to five times.
my ($caught, $killed_mid_seal) = (0, 0);
for my $try (1 .. 5)
{
	$node->safe_psql('postgres', q{
ALTER SYSTEM SET orchestrator.audit_seal_interval = '1h';
SELECT pg_reload_conf();
});
	# what an earlier round left is sealed now, and nothing more until told
	$node->poll_query_until('crashdb', 'SELECT unsealed_rows = 0 FROM orch.audit_seal_status')
	  or die 'the sealer did not seal';
	$node->safe_psql('crashdb',
		"INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series($try * 1000000, $try * 1000000 + 499999) g");
	my $blocks_before = $node->safe_psql('crashdb', 'SELECT count(*) FROM orch.audit_blocks');
	# From now on the sealer seals every 100 ms, and at once.
	$node->safe_psql('postgres', q{
ALTER SYSTEM SET orchestrator.audit_seal_interval = '100ms';
SELECT pg_reload_conf();
});
	my $pid = $node->safe_psql('crashdb', 'SELECT sealer_pid()');
	last unless $pid =~ /^\d+$/;
	$caught++;
	kill 'KILL', $pid;
	$node->poll_query_until('crashdb', 'SELECT true')
	  or die 'the server did not come back';
	if ($node->safe_psql('crashdb', 'SELECT count(*) FROM orch.audit_blocks') eq $blocks_before)
	{
		$killed_mid_seal = 1;
		last;
	}
	note "try $try: the seal had committed before the kill";
}
ok($caught > 0, 'caught the sealer sealing');
ok($killed_mid_seal, 'a seal killed before its commit left no block');
ok($node->poll_query_until('crashdb', 'SELECT unsealed_rows = 0 FROM orch.audit_seal_status'),
	'after the restart the sealer seals everything on its own');
is($node->safe_psql('crashdb', 'SELECT count(*) = max(block_id) FROM orch.audit_blocks'), 't',
	'the chain goes on without a gap');
is($node->safe_psql('crashdb', 'SELECT sum(n_rows) FROM orch.audit_blocks'),
	$node->safe_psql('crashdb', 'SELECT sum(n_events) FROM orch.audit_records'),
	'every row is sealed exactly once');
is(findings('crashdb'), '', 'the chain verifies after the crash');
($rc, $out, $err) = independent('crashdb');
is($rc, 0, 'and the independent verifier agrees') or diag($out, $err);

# ------------------------------------------------------------------------
# The sealer is a process of its own: a step that keeps the database's one
# engine worker busy for seconds does not hold sealing back, and a sealer
# that is stopped is started again.  (The interval is still 100 ms.)
# ------------------------------------------------------------------------
is($node->safe_psql('crashdb', q{
	SELECT count(*) FROM pg_stat_activity
	 WHERE backend_type = 'orchestrator sealer' AND datname = current_database()}),
	'1', 'the database has one sealer');
is($node->safe_psql('crashdb', q{
	SELECT count(*) FROM orch.engine_workers w JOIN pg_stat_activity a USING (pid)
	 WHERE a.backend_type = 'orchestrator sealer'}),
	'0', 'orch.engine_workers does not list it');
$node->safe_psql('crashdb', q{
CREATE FUNCTION public.slow(ctx jsonb) RETURNS jsonb LANGUAGE sql AS $$
	SELECT pg_sleep(6); SELECT '{}'::jsonb
$$;
SELECT orch.define_workflow('slow', '{"steps": [{"name": "wait", "kind": "sql", "function": "public.slow"}]}');
SELECT orch.start_run('slow');
});
ok($node->poll_query_until('crashdb', q{
	SELECT EXISTS (SELECT FROM pg_stat_activity
					WHERE backend_type = 'orchestrator engine' AND datname = current_database()
					  AND wait_event = 'PgSleep')}),
	'the engine is in the slow step');
$node->safe_psql('crashdb', "UPDATE big SET payload = 'z' WHERE id <= 5");
ok($node->poll_query_until('crashdb', 'SELECT unsealed_rows = 0 FROM orch.audit_seal_status'),
	'rows written meanwhile are sealed');
is($node->safe_psql('crashdb', q{
	SELECT count(*) FROM pg_stat_activity
	 WHERE backend_type = 'orchestrator engine' AND datname = current_database()
	   AND wait_event = 'PgSleep'}),
	'1', 'while the engine is still in the slow step');
my $sealer = $node->safe_psql('crashdb', q{
	SELECT pid FROM pg_stat_activity
	 WHERE backend_type = 'orchestrator sealer' AND datname = current_database()});
$node->safe_psql('crashdb', "SELECT pg_terminate_backend($sealer)");
ok($node->poll_query_until('crashdb', qq{
	SELECT count(*) = 1 FROM pg_stat_activity
	 WHERE backend_type = 'orchestrator sealer' AND datname = current_database() AND pid <> $sealer}),
	'a stopped sealer is started again');
$node->safe_psql('crashdb', "UPDATE big SET payload = 'w' WHERE id <= 5");
ok($node->poll_query_until('crashdb', 'SELECT unsealed_rows = 0 FROM orch.audit_seal_status'),
	'and seals');
is($node->safe_psql('crashdb', q{
	SELECT orch.wait_run(run_id, '30s') FROM orch.runs WHERE workflow = 'slow'}),
	'succeeded', 'the slow run finishes');

# ------------------------------------------------------------------------
# A block's hash as docs/audit.md defines it, computed here in SQL: it
# matches what the sealer stored.  Then the newest block's Merkle root
# rewritten, with a block_hash recomputed to match (its successor, which
# would no longer link to it, does not exist): only the rows, whose hashes
# no longer give that root, show it.
# ------------------------------------------------------------------------
$node->safe_psql('crashdb', q{
CREATE FUNCTION f(b bytea) RETURNS bytea LANGUAGE sql AS $$ SELECT '\x01'::bytea || int4send(length(b)) || b $$;
CREATE FUNCTION doc_block_hash(b orch.audit_blocks, root bytea) RETURNS bytea LANGUAGE sql AS $$
SELECT sha256('\x01'::bytea || f(int8send(b.block_id)) || f(int8send(b.xid_from::text::bigint))
	|| f(int8send(b.xid_to::text::bigint))
	|| f(int8send((extract(epoch FROM b.sealed_at) * 1000000)::bigint)) || f(int8send(b.n_rows))
	|| f(root) || f(int8send(b.system_identifier::bigint)) || f(int8send(b.timeline))
	|| f(b.prev_hash)
	|| f(coalesce((SELECT string_agg(int8send(r) || int8send(n), '' ORDER BY o)
					 FROM unnest(b.record_ids, b.record_rows) WITH ORDINALITY u(r, n, o)), ''))
	|| f(b.row_tags))
$$;
});
# a block with rows, made the newest: seal a change of its own
$node->safe_psql('crashdb', "UPDATE big SET payload = 'y' WHERE id <= 3");
$node->safe_psql('crashdb', 'SELECT orch.seal_audit()');
my ($newest, $nrows) = split /\|/, $node->safe_psql('crashdb',
	'SELECT block_id, n_rows FROM orch.audit_blocks ORDER BY block_id DESC LIMIT 1');
ok($nrows >= 3, 'the newest block seals the update');
is($node->safe_psql('crashdb',
	'SELECT count(*) FILTER (WHERE doc_block_hash(b, b.merkle_root) = b.block_hash) || \' of \' || count(*)'
	  . ' FROM orch.audit_blocks b'),
	$node->safe_psql('crashdb', "SELECT count(*) || ' of ' || count(*) FROM orch.audit_blocks"),
	'every block hashes as docs/audit.md says');
$node->safe_psql('crashdb', qq{
ALTER TABLE orch.audit_blocks DISABLE TRIGGER audit_blocks_append_only;
UPDATE orch.audit_blocks b SET merkle_root = sha256('another root'),
	   block_hash = doc_block_hash(b, sha256('another root'))
 WHERE block_id = $newest;
ALTER TABLE orch.audit_blocks ENABLE ALWAYS TRIGGER audit_blocks_append_only;
});
is(findings('crashdb'), "$newest  modified block",
	'a Merkle root that its rows do not give is reported, though the block hashes to its block_hash');
($rc, $out, $err) = independent('crashdb');
is($out, "$newest  modified block", 'the independent verifier reports it too') or diag($err);

# A database whose encoding is not UTF-8: the trail stores text as UTF-8
# and reads it back in the database's encoding; a stored character that
# the encoding lacks was not written by the trail, and is refused (XX001).
$node->safe_psql('postgres',
	"CREATE DATABASE latin TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'");
$node->safe_psql('latin', q{
CREATE EXTENSION orchestrator;
CREATE SCHEMA app;
CREATE TABLE app.t (id int PRIMARY KEY, s text);
SELECT orch.enable_audit('app.t');
INSERT INTO app.t VALUES (1, E'Gr\\u00fc\\u00dfe');
SELECT orch.seal_audit();
});
is($node->safe_psql('latin', q{
	SELECT encode(convert_to(new_row->>'s', 'LATIN1'), 'hex') FROM orch.audit_log WHERE table_name = 'app.t' AND operation = 'INSERT'}),
	'4772fcdf65', 'text of a LATIN1 database reads back as it was written');
is(findings('latin'), '', 'and verifies');
($rc, $out, $err) = independent('latin');
is($rc . $out, '0', 'the independent verifier agrees') or diag($err);
my $event = '\\x01000000080000000000000000010000000178010000000149000100000001750100000001750000000001000001'
  . '00000006530000000141' . '0000';
(my $euro = $event) =~ s/00000006530000000141/000000085300000003e282ac/;
is($node->safe_psql('latin', "SELECT new_row FROM orch._audit_unpack(7, 1, '$event'::bytea, '')"),
	'"A"', 'a stored string reads back');
my ($unpack_rc, $unpack_out, $unpack_err) = $node->psql('latin',
	"\\set VERBOSITY verbose\nSELECT new_row FROM orch._audit_unpack(7, 1, '$euro'::bytea, '')");
like($unpack_err, qr/XX001: audit event 7000 \(of record 7\) is not well formed/,
	'a stored character that LATIN1 lacks is refused as not canonical');

done_testing();
