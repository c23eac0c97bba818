# Approval expiry and escalation fire from the engine alone: nobody is
# connected while the timeouts pass.  A request for finance expires and
# goes to managers; when that one expires too, the request is rejected and
# the run goes on at on_reject's step.  A gate waiting for approval survives
# a crash, and the approval given after it is carried out.
use strict;
use warnings;
use FindBin;
use lib $FindBin::RealBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use OrchTest;

my $node = orch_node('approvals');
orch_install_app($node, 'postgres');
$node->safe_psql('postgres', q{
CREATE ROLE finance;
CREATE ROLE managers;
CREATE ROLE mia IN ROLE managers;
SELECT orch.define_workflow('gate', '{"steps": [
  {"name": "approve", "kind": "approval", "approvers": "finance", "timeout": "2s",
   "on_timeout": {"escalate": "managers"}, "on_reject": {"goto": "give_up"}},
  {"name": "give_up", "kind": "sql", "function": "app.record"}]}');
SELECT orch.define_workflow('gate_slow', '{"steps": [
  {"name": "approve", "kind": "approval", "approvers": "managers"},
  {"name": "after", "kind": "sql", "function": "app.record", "needs": ["approve"]}]}');
});

my $run = $node->safe_psql('postgres', "SELECT orch.start_run('gate')");
# no client from here until both timeouts have passed
sleep(5);
$node->poll_query_until('postgres', "SELECT status = 'succeeded' FROM orch.runs WHERE run_id = '$run'")
  or die "the expired approvals did not end the run";
is($node->safe_psql('postgres', qq{
	SELECT string_agg(approvers || ':' || status || ':' || (escalated_from IS NOT NULL), ' ' ORDER BY approval_id)
	  FROM orch.approvals WHERE run_id = '$run'}),
	'finance:escalated:false managers:expired:true',
	'the request went to managers when it expired, then expired there');
is($node->safe_psql('postgres', qq{
	SELECT string_agg(name || ':' || status, ' ' ORDER BY step_id) FROM orch.steps WHERE run_id = '$run'}),
	'approve:failed give_up:succeeded', 'the expiry rejected the gate, and on_reject took the run on');
is($node->safe_psql('postgres', qq{
	SELECT string_agg(operation || ':' || coalesce(new_row->>'status', ''), ' ' ORDER BY at, audit_id)
	  FROM orch.audit_log WHERE table_name = 'orch.approvals' AND run_id = '$run'}),
	'INSERT:pending UPDATE:escalated INSERT:pending UPDATE:expired',
	'each request, escalation and expiry is in the audit trail');

# A pending request through a crash.
my $run2 = $node->safe_psql('postgres', "SELECT orch.start_run('gate_slow')");
$node->poll_query_until('postgres', "SELECT status = 'needs_approval' FROM orch.runs WHERE run_id = '$run2'")
  or die "the gate did not ask";
$node->stop('immediate');
$node->start;
my $decided = $node->safe_psql('postgres', qq{
	SET ROLE mia;
	SELECT orch.approve(approval_id, 'after the crash') FROM orch.pending_approvals WHERE run_id = '$run2'});
is($decided, 'approved', 'the request was still pending after the crash');
$node->poll_query_until('postgres', "SELECT status = 'succeeded' FROM orch.runs WHERE run_id = '$run2'")
  or die "the approved run did not finish";
is($node->safe_psql('postgres', qq{
	SELECT output->'approved_by' FROM orch.steps WHERE run_id = '$run2' AND name = 'approve'}),
	'["mia"]', 'the gate succeeded with who approved it');

$node->stop;
done_testing();
