// Package command is what the agent's and the server's subcommands share:
// the environment twin of every flag, the logging flags, and the frame of
// an action (decoded configuration, logger, klog routed through it, a
// context that SIGINT or SIGTERM ends). Each role keeps its own flags and
// configuration; only the frame is common, so both commands behave alike
// for an operator.
package command

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/kubezonnet/kubezonnet/internal/logging"
)

// EnvVar is the environment twin of a flag: KUBEZONNET_<FLAG_IN_UPPER_SNAKE>,
// so that manifests can set any flag from a ConfigMap or the downward API.
func EnvVar(flag string) string {
	return "KUBEZONNET_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// WithEnv gives every flag of fs its environment twin and returns fs. A
// flag type it does not know is a programming error: it panics, so a new
// flag cannot ship without its twin.
func WithEnv(fs []cli.Flag) []cli.Flag {
	for _, f := range fs {
		env := []string{EnvVar(f.Names()[0])}
		switch f := f.(type) {
		case *cli.StringFlag:
			f.EnvVars = env
		case *cli.PathFlag:
			f.EnvVars = env
		case *cli.BoolFlag:
			f.EnvVars = env
		case *cli.IntFlag:
			f.EnvVars = env
		case *cli.Int64Flag:
			f.EnvVars = env
		case *cli.DurationFlag:
			f.EnvVars = env
		case *cli.StringSliceFlag:
			f.EnvVars = env
		default:
			panic(fmt.Sprintf("command: flag --%s of type %T has no environment twin", f.Names()[0], f))
		}
	}
	return fs
}

// LogFlags returns --log-level and --log-format, which every command has.
func LogFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "log-level", Value: "info", Usage: "log level (" + strings.Join(logging.Levels, ", ") + ")"},
		&cli.StringFlag{Name: "log-format", Value: "json", Usage: "log format (" + strings.Join(logging.Formats, ", ") + ")"},
	}
}

// Log is the logging flags, decoded.
type Log struct {
	Level, Format string
}

// LogFromCLI decodes the flags of LogFlags.
func LogFromCLI(c *cli.Context) Log {
	return Log{Level: c.String("log-level"), Format: c.String("log-format")}
}

// Validate names the flag at fault.
func (l Log) Validate() error {
	if _, err := logging.ParseLevel(l.Level); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	if !slices.Contains(logging.Formats, l.Format) {
		return fmt.Errorf("--log-format: invalid log format %q (want one of %s)", l.Format, strings.Join(logging.Formats, ", "))
	}
	return nil
}

// Action is the frame of a command's action: fromCLI decodes and
// validates the flags (its error is the command's, before anything
// starts), logs picks the logging flags out of the configuration, and run
// runs the role until the context ends. A failure of run is logged as
// "<name> failed" and returned.
func Action[C any](name string, fromCLI func(*cli.Context) (C, error), logs func(*C) Log,
	run func(context.Context, C, *slog.Logger) error) cli.ActionFunc {
	return func(c *cli.Context) error {
		cfg, err := fromCLI(c)
		if err != nil {
			return err
		}
		l := logs(&cfg)
		log, err := logging.New(os.Stderr, l.Format, l.Level)
		if err != nil {
			return err
		}
		logging.RouteKlog(log)
		ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
		defer stop()
		if err := run(ctx, cfg, log); err != nil {
			log.Error(name+" failed", "err", err)
			return err
		}
		return nil
	}
}
