package testutil

import (
	"fmt"
	"io"

	"github.com/golang/snappy"
)

// ReadSnappy reads a remote-write request body and returns it decoded,
// with its compressed length: what every test receiver does first.
func ReadSnappy(r io.Reader) (body []byte, compressed int, err error) {
	z, err := io.ReadAll(r)
	if err != nil {
		return nil, 0, fmt.Errorf("reading body: %w", err)
	}
	body, err = snappy.Decode(nil, z)
	if err != nil {
		return nil, len(z), fmt.Errorf("snappy: %w", err)
	}
	return body, len(z), nil
}
