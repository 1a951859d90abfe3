// Package state keeps the server's counters durable across crashes: a
// write-ahead log of every change the server acknowledges, and checkpoint
// files that let the log be truncated.
//
// What is durable. A change is appended to the log under the lock that
// orders it (the aggregator's), and its caller waits for Commit before it
// answers the agent. A committer goroutine writes everything queued since
// its last round in one write and one fsync (group commit), so a thousand
// agents sending at once cost one fsync per round, not one per request.
// After a crash at any instant, the records whose Commit returned are in
// the log; a record torn by the crash was never acknowledged.
//
// Checkpoints. Cut, also called under the ordering lock, closes the log's
// current segment at that point of the order, so a snapshot taken under
// the same lock holds exactly the records of the segments before the cut.
// The snapshot is written to a checkpoint file named after the first
// segment it does not hold (written to a temporary file, fsynced, then
// renamed), after which older segments and checkpoints are removed. A
// restart loads the newest checkpoint that reads back whole and replays the
// segments from its number on.
//
// Why Prometheus' tsdb/wlog. It is the log Prometheus itself recovers from
// after every crash: 32 KiB pages, records split across pages with a CRC32
// per fragment, numbered segments, and Repair, which cuts a corrupt or torn
// tail at the last whole record. It lives in the module the server already
// depends on for the remote-write protocol. Measured on this server's load
// (BENCHMARKS.md), its cost is the fsync, which group commit amortises; a
// log of our own would save nothing worth its risk.
//
// Corruption is repaired and counted, never fatal, never invented: records
// after the first corrupt one are dropped (replay cannot know what a lost
// record changed), the loss is logged with its position, and
// kubezonnet_server_state_repairs_total counts it. A checkpoint that does
// not read back whole is skipped for an older one (with the longer log it
// left behind) and counted the same way.
package state
