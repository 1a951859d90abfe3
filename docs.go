package main

import (
	"fmt"
	"strings"

	"github.com/urfave/cli/v2"
)

// flagsMarkdown renders the configuration reference of the README from the
// commands themselves, so that the documentation cannot drift from the
// binary (a test compares the two; `make docs` rewrites the README).
func flagsMarkdown(cmds []*cli.Command) string {
	var b strings.Builder
	for _, c := range cmds {
		fmt.Fprintf(&b, "### `kubezonnet %s`\n\n%s.\n\n", c.Name, c.Usage)
		b.WriteString("| flag | environment | default | meaning |\n| --- | --- | --- | --- |\n")
		for _, f := range c.Flags {
			name := f.Names()[0]
			var env, def, usage string
			if ev, ok := f.(interface{ GetEnvVars() []string }); ok {
				env = strings.Join(ev.GetEnvVars(), ", ")
			}
			if dv, ok := f.(interface{ GetDefaultText() string }); ok {
				def = dv.GetDefaultText()
			}
			if u, ok := f.(interface{ GetUsage() string }); ok {
				usage = u.GetUsage()
			}
			if def == "" || def == `""` {
				def = " "
			} else {
				def = "`" + def + "`"
			}
			if env != "" {
				env = "`" + env + "`"
			}
			usage = strings.ReplaceAll(usage, "|", `\|`)
			fmt.Fprintf(&b, "| `--%s` | %s | %s | %s |\n", name, env, def, usage)
		}
		b.WriteString("\n")
	}
	return b.String()
}
