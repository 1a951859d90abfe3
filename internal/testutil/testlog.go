package testutil

import (
	"io"
	"strings"
	"testing"
)

// TestLog is an io.Writer that puts each write in t's log as a line: the
// progress of a long profile (testenv/scale, testenv/traffic) shows with
// the test's output, and only with it.
type TestLog struct{ T testing.TB }

// Write logs p, less its trailing newline, as one log line.
func (w TestLog) Write(p []byte) (int, error) {
	w.T.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// LogTable puts in t's log the table write writes, failing t when it
// cannot.
func LogTable(t testing.TB, write func(io.Writer) error) {
	t.Helper()
	var table strings.Builder
	if err := write(&table); err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + table.String())
}
