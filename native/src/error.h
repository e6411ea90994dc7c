// Errors inside the library: thrown as dsv4::Error, turned into a status + message at the C API.
#pragma once

#include "dsv4.h"

#include <cstdarg>
#include <stdexcept>
#include <string>

namespace dsv4 {

class Error : public std::runtime_error {
  public:
    Error(dsv4_status status, const std::string & message) : std::runtime_error(message), status_(status) {}
    dsv4_status status() const { return status_; }

  private:
    dsv4_status status_;
};

// printf-style message formatting.
std::string format(const char * fmt, ...) __attribute__((format(printf, 1, 2)));

[[noreturn]] void fail(dsv4_status status, const char * fmt, ...) __attribute__((format(printf, 2, 3)));

// The thread's last error message (what dsv4_last_error() returns).
void set_last_error(const std::string & message);
const char * last_error();

}  // namespace dsv4
