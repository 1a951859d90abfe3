package command

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

func TestWithEnv(t *testing.T) {
	fs := WithEnv(append([]cli.Flag{
		&cli.StringFlag{Name: "server-url"},
		&cli.PathFlag{Name: "state-dir"},
		&cli.BoolFlag{Name: "all-pairs"},
		&cli.IntFlag{Name: "max-flows"},
		&cli.Int64Flag{Name: "max-request-bytes"},
		&cli.DurationFlag{Name: "push-interval"},
		&cli.StringSliceFlag{Name: "external-label"},
	}, LogFlags()...))
	for _, f := range fs {
		name := f.Names()[0]
		env := f.(interface{ GetEnvVars() []string }).GetEnvVars()
		want := "KUBEZONNET_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
		if !slices.Equal(env, []string{want}) {
			t.Errorf("--%s: environment %v, want [%s]", name, env, want)
		}
	}
	defer func() {
		if r := recover(); r == nil || !strings.Contains(r.(string), "--ratio") {
			t.Errorf("a flag type without a twin: recovered %v, want a panic naming --ratio", r)
		}
	}()
	WithEnv([]cli.Flag{&cli.Float64Flag{Name: "ratio"}})
}

func TestLogValidate(t *testing.T) {
	for _, tc := range []struct {
		log  Log
		want string
	}{
		{Log{Level: "info", Format: "json"}, ""},
		{Log{Level: "DEBUG", Format: "text"}, ""},
		{Log{Level: "loud", Format: "json"}, `--log-level: invalid log level "loud"`},
		{Log{Level: "warn", Format: "xml"}, `--log-format: invalid log format "xml"`},
	} {
		err := tc.log.Validate()
		if (err == nil) != (tc.want == "") || err != nil && !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: Validate() = %v, want %q", tc.log, err, tc.want)
		}
	}
}

// TestAction: a configuration error is the command's error and nothing
// runs; the run's error is returned; a good run gets the configuration.
func TestAction(t *testing.T) {
	type config struct {
		Log  Log
		Name string
	}
	errConfig, errRun := errors.New("bad flag"), errors.New("run failed")
	for _, tc := range []struct {
		name      string
		configErr error
		runErr    error
		wantRun   bool
	}{
		{"config error", errConfig, nil, false},
		{"run error", nil, errRun, true},
		{"ok", nil, nil, true},
	} {
		ran := false
		act := Action("test", func(*cli.Context) (config, error) {
			return config{Log: Log{Level: "error", Format: "text"}, Name: "x"}, tc.configErr
		}, func(c *config) Log { return c.Log }, func(_ context.Context, c config, log *slog.Logger) error {
			ran = true
			if c.Name != "x" || log == nil {
				t.Errorf("%s: run got %+v, logger %v", tc.name, c, log)
			}
			return tc.runErr
		})
		err := act(cli.NewContext(&cli.App{}, nil, nil))
		want := tc.configErr
		if want == nil {
			want = tc.runErr
		}
		if !errors.Is(err, want) || (err == nil) != (want == nil) {
			t.Errorf("%s: Action = %v, want %v", tc.name, err, want)
		}
		if ran != tc.wantRun {
			t.Errorf("%s: ran = %v, want %v", tc.name, ran, tc.wantRun)
		}
	}
}
